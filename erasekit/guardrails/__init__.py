"""Concepts, packs (the on-disk format), policies and the user-facing guard objects."""

from erasekit.guardrails.concept import Concept, validate_concept_name
from erasekit.guardrails.fingerprint import ModelFingerprint, fingerprint_model
from erasekit.guardrails.methods import MethodSpec, available_methods, get_method, register_method
from erasekit.guardrails.pack import ConceptPack
from erasekit.guardrails.policy import Policy, PolicyEntry, Toggles, parse_toggles

__all__ = [
    "Concept", "ConceptPack", "MethodSpec", "ModelFingerprint", "Policy", "PolicyEntry", "Toggles",
    "available_methods", "fingerprint_model", "get_method", "parse_toggles", "register_method",
    "validate_concept_name",
]

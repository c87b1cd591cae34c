"""erasekit: stop specific concepts from being generated, per request, without touching weights."""

__version__ = "0.1.0"

from erasekit.errors import ErasekitError, PackError, PolicyError  # noqa: E402
from erasekit.guardrails.concept import Concept  # noqa: E402
from erasekit.guardrails.fingerprint import ModelFingerprint, fingerprint_model  # noqa: E402
from erasekit.guardrails.guard import calibrate, guard  # noqa: E402
from erasekit.guardrails.pack import ConceptPack  # noqa: E402
from erasekit.guardrails.policy import Policy  # noqa: E402

__all__ = [
    "Concept",
    "ConceptPack",
    "ErasekitError",
    "ModelFingerprint",
    "PackError",
    "Policy",
    "PolicyError",
    "__version__",
    "calibrate",
    "fingerprint_model",
    "guard",
]

"""What a guard does when one concept's machinery fails while serving a call.

One rule for every integration, set by the policy's ``on_error``: ``refuse`` (the default,
fail closed) raises :class:`GuardFailure` for that call only; ``pass`` logs a warning and lets
the caller continue without that concept. Either way the failure is counted.
"""

from __future__ import annotations

import logging

from erasekit.errors import GuardFailure
from erasekit.guardrails.policy import Policy


def handle_guard_fault(policy: Policy, counts: dict[str, int], concept: str, part: str, exc: BaseException,
                       logger: logging.Logger, fix: str, fallback: str) -> None:
    """Count the failure, then refuse the call or (``on_error: pass``) warn and return."""
    counts[concept] = counts.get(concept, 0) + 1
    problem = f"the {part} of concept {concept!r} failed ({type(exc).__name__}: {str(exc)[:160]})"
    if policy.on_error == "refuse":
        raise GuardFailure("guard", concept, problem + "; the call is refused (on_error: refuse)",
                           fix + ", or set on_error: pass in the policy") from exc
    logger.warning("erasekit: %s; %s (on_error: pass)", problem, fallback)

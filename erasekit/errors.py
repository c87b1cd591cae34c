"""The one exception type erasekit raises for bad input.

Operators read these messages at 3 a.m.: every error names *where* (a file, a request
parameter, an argument), *which field*, *what was wrong* and *how to fix it*. It subclasses
``ValueError`` so that framework code that already maps ``ValueError`` to "bad request"
(vLLM's ``validate_params``, web frameworks) keeps doing so.
"""

from __future__ import annotations


class ErasekitError(ValueError):
    """Bad input to erasekit: a pack, a policy, a request toggle or an argument.

    Attributes:
        where: the file, request parameter or argument the problem was found in.
        field: the field inside ``where`` that is wrong (``None`` if the whole thing is).
        problem: what is wrong, in plain words.
        fix: what the caller should do about it.
    """

    def __init__(self, where: str, field: str | None, problem: str, fix: str) -> None:
        self.where = where
        self.field = field
        self.problem = problem
        self.fix = fix
        location = f"{where}: field {field!r}" if field else where
        super().__init__(f"{location}: {problem}. Fix: {fix}")


class PackError(ErasekitError):
    """A concept pack on disk is missing, corrupt, unsafe or made for another model."""


class PolicyError(ErasekitError):
    """An operator policy file or a per-request toggle is invalid."""


class GuardFailure(ErasekitError):
    """A configured guard could not run for one request (its classifier or router failed).

    Raised only under the policy's ``on_error: refuse`` (the default): the request is refused
    rather than served unguarded. Other requests are unaffected.
    """

"""What CGCE puts in a flagged prompt's *unconditional* row, given classifier-free guidance.

Refinement moves the conditional row away from the concept; guidance then extrapolates from the
unconditional row towards the conditional one. If the unconditional row also stands away from the
concept, the extrapolation pushes further away. Two sources, both pure tensor maths here (the
diffusers guard decides which rows are conditional and which are flagged):

* a negative *text* (the concept's words, encoded once at calibration): :func:`negative_unconditional`;
* what refinement removed, ``E - E'``: :func:`refined_unconditional`.
"""

from __future__ import annotations

import torch

__all__ = ["negative_unconditional", "refined_unconditional"]


def negative_unconditional(uncond: torch.Tensor, negatives: list[tuple[torch.Tensor, torch.Tensor]]
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(uncond', replaced)``: each row flagged for a concept takes the concept's negative embedding.

    ``uncond`` is ``[I, T, D]``; ``negatives`` pairs a negative embedding ``[T, D]`` with the rows
    ``[I]`` (bool) it applies to. A row flagged for several concepts gets the mean of their
    embeddings, so no concept is dropped and pack order does not matter; the row's own value
    (the empty prompt or the caller's negative prompt) is replaced, since for a flagged row steering
    away from the concept wins. Unflagged rows keep their values.
    """
    total = torch.zeros_like(uncond)
    count = torch.zeros(uncond.shape[0], dtype=uncond.dtype, device=uncond.device)
    for negative, rows in negatives:
        total = total + rows[:, None, None].to(uncond.dtype) * negative.to(uncond.device, uncond.dtype)
        count = count + rows.to(uncond.dtype)
    replaced = count > 0
    mean = total / count.clamp(min=1)[:, None, None]
    return torch.where(replaced[:, None, None], mean, uncond), replaced


def refined_unconditional(uncond: torch.Tensor, before: torch.Tensor, after: torch.Tensor,
                          rows: torch.Tensor) -> torch.Tensor:
    """``uncond + (before - after)`` on ``rows`` ``[I]`` (bool), ``uncond`` elsewhere.

    ``before``/``after`` are the conditional rows before and after refinement: guidance then moves
    away from exactly the displacement the classifier attributes to the concept, while both rows
    share the rest of the prompt (a negative text differs from the empty prompt in more than the
    concept).
    """
    removed = before.to(after.dtype) - after
    return torch.where(rows[:, None, None], uncond + removed, uncond)

"""CGCE refine cost per step, before/after: ``python -m benchmarks.gpu_check.refine_bench [--device cpu|cuda]``.

Compares :func:`erasekit.classifiers.twin.refine` with the implementation it replaced (kept
verbatim below as ``refine_before``, from commit 478c741) on a detector fitted to synthetic
conditioning at two shapes -- the diffusion world's (``T=24, D=384``, 16 rows under CFG, 8
flagged) and SD1.5's (``T=77, D=768``, batch 4 under CFG: 8 rows, 4 flagged) -- with a target no
row can reach, so both run exactly ``--steps`` steps. Reports per step: wall time (median of
``--reps``), torch ops that launch work (profiler, view/metadata ops excluded), host-device syncs
(``aten::_local_scalar_dense`` under ``.item()``, ``bool(tensor)``, ``int(tensor)`` or ``linalg.solve``'s
info check; the CPU LU solver's internal ``item()`` calls are left out), and the largest difference
between the two results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np
import torch

from erasekit.classifiers.detector import fit_detector
from erasekit.classifiers.twin import MAX_STEP_FRACTION, TorchTwin, refine

#: ops that only make views or metadata (no kernel on a GPU)
_NO_KERNEL = {
    "aten::view", "aten::as_strided", "aten::permute", "aten::unsqueeze", "aten::squeeze", "aten::expand",
    "aten::reshape", "aten::_reshape_alias", "aten::t", "aten::transpose", "aten::select", "aten::slice",
    "aten::detach", "aten::detach_", "aten::alias", "aten::empty", "aten::empty_strided", "aten::flatten",
    "aten::resolve_conj", "aten::resolve_neg", "aten::lift_fresh", "aten::numpy_T", "aten::diagonal",
    "aten::expand_as", "aten::view_as", "aten::unbind", "aten::_unsafe_view", "aten::result_type",
    "aten::requires_grad_", "aten::empty_like", "aten::is_nonzero", "aten::item", "aten::to", "aten::narrow",
    "aten::split", "aten::chunk", "aten::movedim", "aten::matrix_H", "aten::mT", "aten::contiguous",
    "aten::_local_scalar_dense", "aten::set_", "aten::lift", "aten::zeros", "aten::ones",
}


def refine_before(embeds, twins, rows, *, etas, max_steps, target_logits):  # noqa: ANN001, ANN201
    """``erasekit.classifiers.twin.refine`` as of commit 478c741 (verbatim loop), for comparison."""
    base = embeds.detach()
    moved = rows.any(dim=0)
    n_c = len(twins)
    with torch.inference_mode(False), torch.enable_grad():
        x = base.float().clone()
        goal = torch.tensor(target_logits, device=x.device, dtype=torch.float32)[:, None]
        eta = torch.tensor(etas, device=x.device, dtype=torch.float32)[:, None]
        rows = rows.to(x.device).clone()
        steps = 0
        for steps in range(max_steps + 1):
            x.requires_grad_(True)
            logits = torch.stack([tw.logits(x) for tw in twins])
            z = logits.detach()
            active = rows & (z > goal)
            if steps == max_steps or not bool(active.any()):
                break
            grads = torch.stack([
                torch.autograd.grad(logits[c].sum(), x, retain_graph=c < n_c - 1)[0] for c in range(n_c)
            ]).flatten(2)
            a = active.T.float()
            gram = torch.einsum("cnf,dnf->ncd", grads, grads) * a[:, :, None] * a[:, None, :]
            ridge = (1e-4 if n_c > 1 else 0.0) * gram.diagonal(dim1=1, dim2=2).amax(dim=1) + 1e-12
            gram = gram + torch.diag_embed(1 - a) + ridge[:, None, None] * torch.eye(n_c, device=x.device)
            residual = ((z - goal) * active).T
            alpha = torch.linalg.solve(gram, residual[..., None])[..., 0] * eta.T * a
            delta = torch.einsum("nc,cnf->nf", alpha, grads)
            limit = MAX_STEP_FRACTION * x.detach().flatten(1).norm(dim=1)
            scale = (limit / delta.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
            x = (x.detach() - (delta * scale[:, None]).view_as(x)).detach()
        out = torch.where(moved[:, None, None].to(x.device), x.detach().to(embeds.dtype), base)
    return out, steps


def _problem(t: int, d: int, n: int, flagged: int, n_c: int, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    twins, rows = [], []
    x = rng.normal(size=(n, t, d)).astype(np.float32)
    for c in range(n_c):
        concept = rng.normal(size=(2, d)).astype(np.float32)
        safe = rng.normal(size=(24, t, d)).astype(np.float32)
        unsafe = rng.normal(size=(24, t, d)).astype(np.float32)
        unsafe[:, 3:5] += 2 * concept
        twins.append(TorchTwin.from_detector(fit_detector(unsafe, safe, concept, C=0.01, flat=True)))
        x[:flagged, 3 + c : 5 + c] += 2 * concept
        r = np.zeros(n, bool)
        r[:flagged] = True
        rows.append(r)
    return torch.from_numpy(x), twins, torch.from_numpy(np.stack(rows))


def _kernel_ops(fn: Any) -> tuple[int, int]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = syncs = 0
    for evt in prof.events():
        if evt.name == "aten::_local_scalar_dense":
            chain, q = [], evt.cpu_parent
            while q is not None:
                chain.append(q.name)
                q = q.cpu_parent
            # linalg_lu_solve's own item() calls are CPU-kernel internals (kept out of the count)
            syncs += "aten::linalg_lu_solve" not in chain
        # count the outermost aten op of each call chain that does work
        if not evt.name.startswith("aten::") or evt.name in _NO_KERNEL:
            continue
        parent = evt.cpu_parent
        while parent is not None and (not parent.name.startswith("aten::") or parent.name in _NO_KERNEL):
            parent = parent.cpu_parent
        if parent is None:
            ops += 1
    return ops, syncs


def _one(device: torch.device, steps: int, reps: int, t: int, d: int, n: int, flagged: int, n_c: int) -> dict:
    x, twins, rows = _problem(t, d, n, flagged, n_c)
    x, rows = x.to(device), rows.to(device)
    twins = [tw.to(device) for tw in twins]
    # unreachable target: exactly ``steps`` steps; ``[1e4]``: nothing active, the fixed per-call part
    kw = {"etas": [1.0] * n_c, "max_steps": steps, "target_logits": [-1e4] * n_c}
    kw0 = {**kw, "target_logits": [1e4] * n_c}

    def before(**k: Any) -> tuple[torch.Tensor, int]:
        return refine_before(x, twins, rows, **k)

    def after(**k: Any) -> tuple[torch.Tensor, int]:
        r = refine(x, twins, rows, **k)
        return r.embeds, r.steps

    runs = {"before": before, "after": after}
    res: dict[str, Any] = {"shape": {"T": t, "D": d, "rows": n, "flagged": flagged, "classifiers": n_c}}
    outs = {k: f(**kw) for k, f in runs.items()}  # warm-up, and the results compared below
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(reps):  # interleaved, order alternating
        for k in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            runs[k](**kw)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t0)
    for k, f in runs.items():
        n_steps = outs[k][1]
        ops, syncs = _kernel_ops(lambda f=f: f(**kw))
        fixed_ops, fixed_syncs = _kernel_ops(lambda f=f: f(**kw0))
        res[k] = {
            "steps": n_steps,
            "median_ms": round(statistics.median(times[k]) * 1e3, 3),
            "ms_per_step": round(statistics.median(times[k]) * 1e3 / max(n_steps, 1), 3),
            "ops_per_call": ops,
            "syncs_per_call": syncs,
            "ops_per_step": round((ops - fixed_ops) / max(n_steps, 1), 1),
            "syncs_per_step": round((syncs - fixed_syncs) / max(n_steps, 1), 2),
        }
    a, b = outs["before"][0].float(), outs["after"][0].float()
    moved = rows.any(0)
    res["max_abs_diff"] = float((a - b).abs().max())
    res["max_rel_diff_moved_rows"] = float((a - b)[moved].norm() / (a - x.float())[moved].norm())
    res["unflagged_rows_identical"] = bool(torch.equal(b[~moved], x[~moved]))
    res["speedup"] = round(res["before"]["median_ms"] / res["after"]["median_ms"], 3)
    return res


def measure(device: torch.device, steps: int, reps: int, shapes: dict[str, tuple]) -> dict[str, Any]:
    return {name: _one(device, steps, reps, *shape) for name, shape in shapes.items()}


#: name -> (T, D, rows, flagged rows, classifiers)
SHAPES = {
    "world_c1": (24, 384, 16, 8, 1),
    "sd15_b4_c1": (77, 768, 8, 4, 1),
    "world_c2": (24, 384, 16, 8, 2),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check.refine_bench", description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", default=None, help="write the JSON here")
    args = p.parse_args(argv)
    res = {"device": args.device, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
           "results": measure(torch.device(args.device), args.steps, args.reps, SHAPES)}
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Linear probe: a linear classifier on frozen, multi-clip averaged backbone features.

Training (deterministic, no tuning on the test split): features are standardised with the train split's
per-dimension mean and standard deviation, then a linear layer (zero-initialised; the problem is convex) is
fitted by full-batch L-BFGS (torch.optim.LBFGS, strong-Wolfe line search) on the mean cross-entropy plus an
L2 penalty weight_decay / 2 * ||W||^2 on the weights (not the bias). Test: top-1 and top-5 (top-min(5, C))
over all test videos; a test video without a feature counts as wrong.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

METHOD = "full-batch L-BFGS (strong-Wolfe line search) on standardised features, cross-entropy + L2"


class LinearProbe(nn.Module):
    """Standardisation (buffers mean, std: (F,)) followed by Linear(F, C)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.linear = nn.Linear(dim, num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, F) features -> (N, C) logits."""
        return self.linear((x - self.mean) / self.std)


def _check(x: torch.Tensor, y: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{name} features must be a floating-point (N, F) tensor")
    if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],) or y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"{name} labels must be an integer tensor of shape ({x.shape[0]},)")


def train_linear_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, weight_decay: float = 1e-3,
                       max_iter: int = 300, standardise: bool = True) -> tuple[LinearProbe, dict]:
    """Fit a LinearProbe on features x (N, F) with labels y (N,) in [0, num_classes).

    Returns (probe in eval mode, {"final_loss", "iterations", "train_accuracy", "method", "weight_decay"}).
    """
    _check(x, y, "train")
    if x.shape[0] == 0:
        raise ValueError("train features: no rows (no readable training videos)")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"train labels must be in [0, {num_classes - 1}], got [{int(y.min())}, {int(y.max())}]")
    if weight_decay < 0 or max_iter < 1:
        raise ValueError(f"weight_decay must be >= 0 and max_iter >= 1, got {weight_decay}, {max_iter}")
    x = x.float()
    probe = LinearProbe(x.shape[1], num_classes).to(x.device)
    if standardise:
        probe.mean.copy_(x.mean(0))
        probe.std.copy_(x.std(0, unbiased=False).clamp_min(1e-6))
    params = list(probe.linear.parameters())
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)
    calls = [0]

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe(x), y) + 0.5 * weight_decay * probe.linear.weight.pow(2).sum()
        loss.backward()
        calls[0] += 1
        return loss

    with torch.enable_grad():
        opt.step(closure)
        final = float(closure().detach())
    probe.eval()
    with torch.no_grad():
        acc = float((probe(x).argmax(1) == y).float().mean())
    state = opt.state[params[0]]
    return probe, {"final_loss": final, "iterations": int(state.get("n_iter", 0)), "function_evals": calls[0],
                   "train_accuracy": acc, "method": METHOD, "weight_decay": weight_decay}


@torch.no_grad()
def evaluate_probe(probe: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                   valid: Optional[torch.Tensor] = None, topk: int = 5) -> dict:
    """Top-1 and top-k accuracy over all rows (rows with valid=False count as wrong) and the confusion
    matrix int64 (C, C) [true, predicted] of the valid rows. k = min(topk, num_classes); the top-k
    accuracy is returned as "top5" whatever k is, with k as "top5_k"."""
    _check(x, y, "test")
    valid = torch.ones(x.shape[0], dtype=torch.bool) if valid is None else valid.bool().cpu()
    n = x.shape[0]
    if n == 0:
        raise ValueError("test features: no rows")
    k = min(topk, num_classes)
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    pred = torch.full((n,), -1, dtype=torch.int64)
    top1 = topk_hits = 0
    if valid.any():
        logits = probe(x[valid.to(x.device)].float()).cpu()
        yv = y[valid].cpu()
        best = logits.topk(k, dim=1).indices
        pred[valid] = best[:, 0]
        top1 = int((best[:, 0] == yv).sum())
        topk_hits = int((best == yv[:, None]).any(1).sum())
        known = (yv >= 0) & (yv < num_classes)
        conf.index_put_((yv[known], best[known, 0]), torch.ones(int(known.sum()), dtype=torch.int64),
                        accumulate=True)
    return {"top1": top1 / n, "top5": topk_hits / n, "top5_k": k, "tested": n,
            "without_feature": int((~valid).sum()), "confusion": conf, "predictions": pred}


def evaluate_linear_probe(ev, out_dir: str, *, split: int = 1, weight_decay: float = 1e-3, max_iter: int = 300,
                          batch_size: int = 8, num_workers: int = 0, video_backend: str = "auto",
                          progress: bool = False) -> dict:
    """Linear probe for an `Evaluation` (features.setup_evaluation): train on the train set's features,
    test on the test set; writes the "linear_probe" section of out_dir/results.json, the confusion matrix
    and projection plots and report.md; returns the section."""
    import os
    import time

    from . import report
    t0 = time.perf_counter()
    train = ev.features("train", batch_size=batch_size, num_workers=num_workers, video_backend=video_backend,
                        progress=progress)
    test = ev.features("test", batch_size=batch_size, num_workers=num_workers, video_backend=video_backend,
                       progress=progress)
    t1 = time.perf_counter()
    names = ev.info["class_names"]
    C = len(names)
    xtr, ytr = train.features[train.valid], train.labels[train.valid]
    nonfinite = int((~torch.isfinite(xtr)).any(1).sum() + (~torch.isfinite(test.features[test.valid])).any(1).sum())
    if nonfinite:
        nan = float("nan")
        fit = {"final_loss": nan, "iterations": 0, "train_accuracy": nan, "method": METHOD,
               "weight_decay": weight_decay}
        result = {"top1": nan, "top5": nan, "top5_k": min(5, C), "tested": len(test.paths),
                  "without_feature": test.num_failed, "confusion": torch.zeros(C, C, dtype=torch.int64)}
    else:
        probe, fit = train_linear_probe(xtr, ytr, C, weight_decay=weight_decay, max_iter=max_iter)
        result = evaluate_probe(probe, test.features, test.labels, C, valid=test.valid)
    t2 = time.perf_counter()
    c = ev.config
    protocol = {"dataset": ev.info["dataset"], "split": split, "frames": c.frames, "stride": c.stride,
                "clips": c.clips, "crop": c.crop, "size": c.size, "long": c.long, "holdout": ev.info["holdout"]}
    section = {
        "top1": result["top1"], "top5": result["top5"], "top5_k": result["top5_k"], "tested": result["tested"],
        "without_feature": result["without_feature"], "trained_on": int(train.valid.sum()),
        "train_without_feature": train.num_failed, "nonfinite": nonfinite, **fit,
        "confusion": result["confusion"], "protocol": protocol,
        "failures": {"test": test.failures, "train": train.failures},
        "failed_examples": (test.failed + train.failed)[:10],
        "features": {"decoded": test.decoded + train.decoded,
                     "from_cache": len(test.paths) + len(train.paths) - test.decoded - train.decoded,
                     "seconds": t1 - t0},
        "fit_seconds": t2 - t1, **ev.describe(),
    }
    os.makedirs(out_dir, exist_ok=True)
    report.plot_confusion(result["confusion"], names, os.path.join(out_dir, report.PLOTS["confusion"]))
    from .retrieval import save_section
    return save_section(out_dir, "linear_probe", section, test, names, centre=True)

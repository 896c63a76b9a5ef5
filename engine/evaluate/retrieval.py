"""Nearest-neighbour video retrieval (docs/method.md §6.3): recall at k of test queries against the train set.

Protocol: each set (queries, gallery) is centred on its own mean feature, rows are L2-normalised, similarity
is the dot product (cosine), and a query is correct at k when any of its k most similar gallery videos has
its class. Ties in similarity are broken by gallery order (the lower gallery index ranks first), so the
result does not depend on how the computation is chunked.

Videos whose features could not be computed: a query without a feature is a miss at every k (it stays in
the denominator); a gallery video without a feature cannot be retrieved. Both counts are returned.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

DEFAULT_KS = (1, 5, 10, 20, 50)


# ----------------------------------------------------------------------------- checks and preprocessing
def _check_features(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point (N, F) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")


def _check_vector(name: str, v: Optional[torch.Tensor], n: int, dtype_ok) -> None:
    if v is None:
        return
    if not isinstance(v, torch.Tensor) or v.shape != (n,) or not dtype_ok(v):
        raise ValueError(f"{name} must be a 1-D tensor of length {n} "
                         f"({'int' if dtype_ok is _is_int else 'bool'}), got "
                         f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")


def _is_int(v: torch.Tensor) -> bool:
    return not v.is_floating_point() and not v.is_complex() and v.dtype != torch.bool


def _is_bool(v: torch.Tensor) -> bool:
    return v.dtype == torch.bool


def check_ks(ks: Sequence[int]) -> tuple:
    ks = tuple(ks)
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    return tuple(sorted(set(ks)))


def centre_and_normalise(x: torch.Tensor, valid: Optional[torch.Tensor] = None, centre: bool = True) -> torch.Tensor:
    """(N, F) -> (N, F): subtract the mean of the valid rows (if centre), then L2-normalise each row.

    Invalid rows are excluded from the mean and returned as zeros. A row that is zero after centring stays
    zero (similarity 0 to everything)."""
    valid = torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if valid is None else valid.to(x.device)
    out = torch.zeros_like(x)
    if valid.any():
        v = x[valid]
        if centre:
            v = v - v.mean(0, keepdim=True)
        out[valid] = F.normalize(v, dim=1)
    return out


# ----------------------------------------------------------------------------- neighbours
def nearest_neighbours(query: torch.Tensor, gallery: torch.Tensor, k: int, chunk_size: int = 1024
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k gallery rows by dot product for every query row, computed block by block.

    query (Q, F), gallery (G, F) -> (similarities (Q, k'), gallery indices int64 (Q, k')) with k' = min(k, G),
    ordered by similarity descending, ties by lower gallery index. At most chunk_size x chunk_size
    similarities exist at once (plus the running top-k): a 10k x 10k search never builds the full matrix.
    """
    _check_features("query", query)
    _check_features("gallery", gallery)
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query and gallery must have the same feature size, got {query.shape[1]} and "
                         f"{gallery.shape[1]}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    Q, G = query.shape[0], gallery.shape[0]
    k = min(k, G)
    out_v = query.new_empty(Q, k)
    out_i = torch.empty(Q, k, dtype=torch.int64, device=query.device)
    if k == 0:
        return out_v, out_i
    for q0 in range(0, Q, chunk_size):
        q = query[q0:q0 + chunk_size]
        best_v = best_i = None
        for g0 in range(0, G, chunk_size):
            s = q @ gallery[g0:g0 + chunk_size].T
            # stable sort: equal similarities keep gallery order; the running best (lower indices) comes first
            v, i = torch.sort(s, dim=1, descending=True, stable=True)
            v, i = v[:, :k], i[:, :k] + g0
            if best_v is not None:
                v, order = torch.sort(torch.cat([best_v, v], 1), dim=1, descending=True, stable=True)
                i = torch.cat([best_i, i], 1).gather(1, order)
                v, i = v[:, :k], i[:, :k]
            best_v, best_i = v, i
        out_v[q0:q0 + chunk_size], out_i[q0:q0 + chunk_size] = best_v, best_i
    return out_v, out_i


def first_hit_ranks(neighbours: torch.Tensor, query_labels: torch.Tensor, gallery_labels: torch.Tensor) -> torch.Tensor:
    """int64 (Q,): 1-based rank of the first neighbour sharing the query's class, 0 when none of the k does."""
    hits = gallery_labels[neighbours] == query_labels[:, None]
    k = neighbours.shape[1]
    pos = torch.arange(1, k + 1, device=neighbours.device).expand_as(hits)
    ranks = torch.where(hits, pos, torch.full_like(pos, k + 1)).min(1).values if k else \
        torch.zeros(neighbours.shape[0], dtype=torch.int64)
    return torch.where(ranks > k, torch.zeros_like(ranks), ranks)


# ----------------------------------------------------------------------------- recall
def recall_at_k(query: torch.Tensor, query_labels: torch.Tensor, gallery: torch.Tensor, gallery_labels: torch.Tensor,
                ks: Sequence[int] = DEFAULT_KS, *, centre: bool = True, query_valid: Optional[torch.Tensor] = None,
                gallery_valid: Optional[torch.Tensor] = None, chunk_size: int = 1024) -> dict:
    """Recall at each k of `ks` (fractions in [0, 1]) of queries against the gallery (docs/method.md §6.3).

    query (Q, F) float, query_labels (Q,) int, gallery (G, F) float, gallery_labels (G,) int; *_valid: bool
    masks of rows that have a feature (default all). centre: subtract each set's own mean first.
    Returns {"recall": {k: r}, "curve": [recall at 1..max(ks)], "ranks": int64 (Q,) first-hit ranks
    (0 = no hit within max(ks)), "queries", "queries_without_feature", "gallery", "gallery_without_feature",
    "nonfinite": valid rows with NaN/inf features}. k larger than the usable gallery behaves as the gallery
    size. Non-finite features make every recall NaN (NaN in, NaN out).
    """
    ks = check_ks(ks)
    _check_features("query", query)
    _check_features("gallery", gallery)
    Q, G = query.shape[0], gallery.shape[0]
    if Q == 0:
        raise ValueError("query must have at least one row (no test videos)")
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query and gallery must have the same feature size, got {query.shape[1]} and "
                         f"{gallery.shape[1]}")
    _check_vector("query_labels", query_labels, Q, _is_int)
    _check_vector("gallery_labels", gallery_labels, G, _is_int)
    _check_vector("query_valid", query_valid, Q, _is_bool)
    _check_vector("gallery_valid", gallery_valid, G, _is_bool)
    dev = query.device
    qv = torch.ones(Q, dtype=torch.bool, device=dev) if query_valid is None else query_valid.to(dev)
    gv = torch.ones(G, dtype=torch.bool, device=dev) if gallery_valid is None else gallery_valid.to(dev)
    gallery, gallery_labels, query_labels = gallery.to(dev), gallery_labels.to(dev), query_labels.to(dev)
    max_k = ks[-1]
    nonfinite = int((~torch.isfinite(query[qv])).any(1).sum() + (~torch.isfinite(gallery[gv])).any(1).sum())
    info = {"queries": Q, "queries_without_feature": int((~qv).sum()), "gallery": int(gv.sum()),
            "gallery_without_feature": int((~gv).sum()), "nonfinite": nonfinite, "centre": bool(centre)}
    if nonfinite:
        nan = float("nan")
        return {"recall": {k: nan for k in ks}, "curve": [nan] * max_k,
                "ranks": torch.zeros(Q, dtype=torch.int64), **info}
    q = centre_and_normalise(query, qv, centre)[qv]
    g_idx = gv.nonzero().flatten()
    g = centre_and_normalise(gallery, gv, centre)[g_idx]
    ranks = torch.zeros(Q, dtype=torch.int64, device=dev)
    if q.shape[0] and g.shape[0]:
        _, nn_idx = nearest_neighbours(q, g, max_k, chunk_size)
        ranks[qv] = first_hit_ranks(nn_idx, query_labels[qv], gallery_labels[g_idx])
    ranks = ranks.cpu()
    hit = ranks > 0
    curve = [float((hit & (ranks <= k)).sum()) / Q for k in range(1, max_k + 1)]
    return {"recall": {k: curve[k - 1] for k in ks}, "curve": curve, "ranks": ranks, **info}


def recall_at_k_reference(query, query_labels, gallery, gallery_labels, ks=DEFAULT_KS, *, centre=True,
                          query_valid=None, gallery_valid=None) -> dict:
    """Slow, literal float64 version of `recall_at_k` (the full similarity matrix, a Python loop per
    query): {k: recall}. For tests."""
    import numpy as np
    q = np.asarray(query, dtype=np.float64)
    g = np.asarray(gallery, dtype=np.float64)
    ql, gl = np.asarray(query_labels), np.asarray(gallery_labels)
    qv = np.ones(len(q), bool) if query_valid is None else np.asarray(query_valid, bool)
    gv = np.ones(len(g), bool) if gallery_valid is None else np.asarray(gallery_valid, bool)

    def prep(x, m):
        x = x[m]
        if centre and len(x):
            x = x - x.mean(0)
        n = np.sqrt((x * x).sum(1, keepdims=True))
        return x / np.maximum(n, 1e-12)
    qn, gn, gl = prep(q, qv), prep(g, gv), gl[gv]
    sims = qn @ gn.T
    out = {}
    for k in ks:
        correct = 0
        for row, lab in zip(sims, ql[qv]):
            order = sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]
            correct += any(gl[j] == lab for j in order)
        out[k] = correct / len(q)
    return out


# ----------------------------------------------------------------------------- the paper's row
PAPER_TABLE5 = {
    "method": "DualVar, paper Table 5",
    "arch": "R(2+1)D-10 (r2plus1d_10)",
    "recall": {1: 46.7, 5: 63.1, 10: 69.7, 20: 78.0, 50: 87.8},
    "setting": "UCF101 split 1 (test queries vs train gallery minus 800 held-out videos), 10 clips of 16 "
               "frames at stride 4, 112 crop, per-set mean-centring; pretraining set not stated in the table "
               "(presumably Kinetics-400, SimCLR, 200 epochs, checkpoint of epoch 189)",
}


def protocol_matches_paper(protocol: dict) -> bool:
    """Whether a retrieval run used the paper's protocol (docs/method.md §6.3), so that the paper's Table 5
    row may stand beside it. The backbone and pretraining budget may differ (the table compares methods)."""
    want = {"dataset": "ucf101", "split": 1, "frames": 16, "stride": 4, "clips": 10, "crop": 112, "size": 128,
            "long": 171, "centre": True, "holdout": 800}
    return all(protocol.get(k) == v for k, v in want.items()) and set(DEFAULT_KS) <= set(protocol.get("ks", ()))


def recall_table_rows(recall: dict) -> dict:
    """{k: percent} for display; NaN stays NaN."""
    return {int(k): (100.0 * v if not (isinstance(v, float) and math.isnan(v)) else float("nan"))
            for k, v in recall.items()}


# ----------------------------------------------------------------------------- the evaluation
def evaluate_retrieval(ev, out_dir: str, *, split: int = 1, ks: Sequence[int] = DEFAULT_KS, centre: bool = True,
                       chunk_size: int = 1024, batch_size: int = 8, num_workers: int = 0, video_backend: str = "auto",
                       progress: bool = False) -> dict:
    """Run retrieval for an `Evaluation` (features.setup_evaluation), write the "retrieval" section of
    out_dir/results.json, the plots and report.md; returns the section.

    split: the dataset's split number the index was built with (recorded; the paper's row needs split 1).
    """
    import time

    from . import report
    ks = check_ks(ks)
    t0 = time.perf_counter()
    test = ev.features("test", batch_size=batch_size, num_workers=num_workers, video_backend=video_backend,
                       progress=progress)
    train = ev.features("train", batch_size=batch_size, num_workers=num_workers, video_backend=video_backend,
                        progress=progress)
    t1 = time.perf_counter()
    res = recall_at_k(test.features, test.labels, train.features, train.labels, ks, centre=centre,
                      query_valid=test.valid, gallery_valid=train.valid, chunk_size=chunk_size)
    t2 = time.perf_counter()
    c = ev.config
    protocol = {"dataset": ev.info["dataset"], "split": split, "frames": c.frames, "stride": c.stride,
                "clips": c.clips, "crop": c.crop, "size": c.size, "long": c.long, "centre": centre,
                "holdout": ev.info["holdout"], "ks": list(ks)}
    paper = PAPER_TABLE5 if protocol_matches_paper(protocol) else None
    section = {
        "recall": res["recall"], "curve": res["curve"], "centre": centre, "chunk_size": chunk_size,
        "queries": res["queries"], "queries_without_feature": res["queries_without_feature"],
        "gallery": res["gallery"], "gallery_without_feature": res["gallery_without_feature"],
        "nonfinite": res["nonfinite"], "protocol": protocol, "paper": paper,
        "failures": {"test": test.failures, "train": train.failures},
        "failed_examples": (test.failed + train.failed)[:10],
        "features": {"decoded": test.decoded + train.decoded,
                     "from_cache": len(test.paths) + len(train.paths) - test.decoded - train.decoded,
                     "seconds": t1 - t0},
        "search_seconds": t2 - t1, **ev.describe(),
    }
    names = ev.info["class_names"]
    label = f"{ev.meta.get('backbone')} ({'centred' if centre else 'not centred'})"
    ref = {f"{PAPER_TABLE5['method']}": PAPER_TABLE5["recall"]} if paper else None
    os.makedirs(out_dir, exist_ok=True)
    report.plot_recall_curves({label: res["curve"]}, os.path.join(out_dir, report.PLOTS["recall"]), reference=ref)
    return save_section(out_dir, "retrieval", section, test, names, centre)


def save_section(out_dir: str, name: str, section: dict, test, names, centre: bool) -> dict:
    """Write an evaluation's section into out_dir's results.json, its 2-D projection of the test features
    (when at least two have a feature) and the refreshed report.md; returns the section."""
    from . import report
    if test.valid.sum() >= 2:
        feats = centre_and_normalise(test.features, test.valid, centre)[test.valid]
        report.plot_projection(feats, test.labels[test.valid], names, os.path.join(out_dir, report.PLOTS["projection"]))
    report.update_results(out_dir, name, section)
    report.write_report(out_dir)
    return section

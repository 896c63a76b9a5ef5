"""Shuffle-rank loss, forward + backward: the unfused torch version (the reference's scatter calibration,
bmm, masks, gathers and capped softplus, once per anchor set) vs the fused backends.

SimCLR's two-anchor form L = 0.5 R(u0, p) + 0.5 R(u2, p), s = 2, d = 64, theta = 0.05, cap = 5, for
B in {64, 256, 1024, 4096}. Every provider gets the same inputs; the timed function runs forward and
backward and synchronises. The fused/unfused ratio is computed from the medians of one run
(see bench/results/shuffle_rank_cpu.md).
"""
import pytest
import torch
import torch.nn.functional as F

import dualvar.kernels as K
from conftest import HAS_CUDA, run_timed

S, D, THETA, CAP = 2, 64, 0.05, 5.0
BATCHES = [64, 256, 1024, 4096]


def unfused(u0, u2, y, perm):
    """The reference's op sequence (METHOD.md 3.3, 8.5): scatter calibration, then per anchor set a
    concatenation, a bmm Gram matrix, a positive gather, a masked gather of negatives, clamp, softplus."""
    p = F.normalize(y, dim=-1)
    p = p.scatter(1, perm.unsqueeze(-1).expand_as(p), p)
    total = 0
    for a in (u0, u2):
        x = torch.cat([a, p], dim=1)
        sim = torch.bmm(x, x.transpose(1, 2))
        idx = torch.arange(2 * S, device=x.device)
        cp = (idx + S) % (2 * S)
        pos = sim[:, idx, cp].unsqueeze(-1)
        mask = (idx.view(-1, 1) != idx.view(1, -1)) & (cp.view(-1, 1) != idx.view(1, -1))
        diff = ((sim - pos) / THETA)[:, mask]
        total = total + 0.5 * torch.log(1 + torch.exp(torch.clamp(diff, max=CAP))).mean()
    return total


CASES = [("cpu", "unfused"), ("cpu", "torch"), ("cpu", "cpu")]
if HAS_CUDA:
    # *_nocheck: without the permutation check (a sort and one host sync per call); the kernels stay
    # memory-safe for a bad perm, and the trainer's perms come from random_segment_permutation.
    CASES += [("cuda", "unfused"), ("cuda", "torch"), ("cuda", "triton"), ("cuda", "cuda"),
              ("cuda", "triton_nocheck"), ("cuda", "cuda_nocheck")]


@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("device,provider", CASES)
def test_shuffle_rank_fwd_bwd(benchmark, device, provider, B):
    g = torch.Generator().manual_seed(B)
    u0 = F.normalize(torch.randn(B, S, D, generator=g), dim=-1).to(device).requires_grad_(True)
    u2 = F.normalize(torch.randn(B, S, D, generator=g), dim=-1).to(device).requires_grad_(True)
    y = torch.randn(B, S, D, generator=g).to(device).requires_grad_(True)
    perm = K.random_segment_permutation(B, S, generator=g).to(device)

    if provider == "unfused":
        def step():
            loss = unfused(u0, u2, y, perm)
            loss.backward()
            return loss
    else:
        backend, check = provider.replace("_nocheck", ""), not provider.endswith("_nocheck")

        def step():
            loss = K.shuffle_rank_loss(u0, y, perm, THETA, cap=CAP, weight=0.5, anchor2=u2, weight2=0.5,
                                       check_perm=check, backend=backend)
            loss.backward()
            return loss

    loss = run_timed(benchmark, step, device, rounds=30, warmup=3)
    if provider != "unfused":
        assert K.last_backend("shuffle_rank") == provider.replace("_nocheck", "")
    ref = unfused(u0.detach(), u2.detach(), y.detach(), perm)
    torch.testing.assert_close(loss.detach().float(), ref.float(), rtol=1e-4, atol=1e-5)
    benchmark.extra_info.update(provider=provider, device=device, B=B, s=S, d=D,
                                median_us=benchmark.stats.stats.median * 1e6)


def ratio_table(path: str) -> str:
    """Markdown table of unfused/provider median ratios from a pytest-benchmark JSON file."""
    import json
    med = {}
    for b in json.load(open(path))["benchmarks"]:
        e = b["extra_info"]
        if "B" in e and e.get("s") == S:
            med[(e["device"], e["provider"], e["B"])] = b["stats"]["median"]
    lines = []
    for dev in sorted({k[0] for k in med}):
        provs = [p for p in ("torch", "cpu", "triton", "cuda", "triton_nocheck", "cuda_nocheck")
                 if all((dev, p, B) in med for B in BATCHES)]
        lines.append("| device | B | unfused ms | " + " | ".join(f"{p} ms | unfused/{p}" for p in provs) + " |")
        lines.append("|---|---|---|" + "---|---|" * len(provs))
        for B in BATCHES:
            u = med.get((dev, "unfused", B))
            if u is None:
                continue
            cells = " | ".join(f"{med[(dev, p, B)] * 1e3:.3f} | {u / med[(dev, p, B)]:.2f}x" for p in provs)
            lines.append(f"| {dev} | {B} | {u * 1e3:.3f} | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python bench/test_bench_shuffle_rank.py RESULT.json
    import sys
    print(ratio_table(sys.argv[1]))

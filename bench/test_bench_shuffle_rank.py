"""Shuffle-rank loss: forward, backward and forward+backward of the reference (plain torch, the
comparison), the torch backend and the fused kernels, with time and peak memory.

SimCLR's two-anchor form L = 0.5 R(u0, p) + 0.5 R(u2, p), s = 2, d = 64, theta = 0.05, cap = 5, for
B in {64, 256, 1024, 4096}. Every provider gets the same inputs (leaves that require grad, as in
training); the timed function synchronises. Rows:
    fwd      the forward (building the autograd graph)
    bwd      the backward of a forward run outside the timed function
    fwd_bwd  both
Peak memory: bytes allocated beyond what was live before the timed part, for one run of it (CUDA: the
caching allocator's peak; CPU: the running total of the CPU allocator's allocation events, recorded by
the profiler). `reference` is `shuffle_rank_loss_reference` (docs/method.md §3.3), called once per
anchor set. `python bench/test_bench_shuffle_rank.py RESULT.json` prints the ratio table
(reference / provider and torch / provider of the medians of one run; see
bench/results/shuffle_rank_cpu.md).
"""
import pytest
import torch
import torch.nn.functional as F

import dualvar.kernels as K
from bench_helpers import HAS_CUDA, sync

S, D, THETA, CAP = 2, 64, 0.05, 5.0
BATCHES = [64, 256, 1024, 4096]
MODES = ["fwd", "bwd", "fwd_bwd"]
PROVIDERS = {"cpu": ["reference", "torch", "cpu"],
             # *_nocheck: without the permutation check (a sort and one host sync per call); the kernels
             # stay memory-safe for a bad perm, and the trainer's perms come from random_segment_permutation.
             "cuda": ["reference", "torch", "triton", "cuda", "triton_nocheck", "cuda_nocheck"]}
CASES = [(dev, p) for dev in (["cpu", "cuda"] if HAS_CUDA else ["cpu"]) for p in PROVIDERS[dev]]


def loss_fn(provider):
    if provider == "reference":
        return lambda u0, u2, y, perm: (K.shuffle_rank_loss_reference(u0, y, perm, THETA, cap=CAP, weight=0.5)
                                        + K.shuffle_rank_loss_reference(u2, y, perm, THETA, cap=CAP, weight=0.5))
    backend, check = provider.replace("_nocheck", ""), not provider.endswith("_nocheck")
    return lambda u0, u2, y, perm: K.shuffle_rank_loss(u0, y, perm, THETA, cap=CAP, weight=0.5, anchor2=u2,
                                                       weight2=0.5, check_perm=check, backend=backend)


def peak_bytes(fn, device):
    """Peak bytes allocated during fn() beyond what was live before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("device,provider", CASES)
def test_shuffle_rank(benchmark, device, provider, B, mode):
    g = torch.Generator().manual_seed(B)
    inputs = [F.normalize(torch.randn(B, S, D, generator=g), dim=-1).to(device),
              F.normalize(torch.randn(B, S, D, generator=g), dim=-1).to(device),
              torch.randn(B, S, D, generator=g).to(device)]
    perm = K.random_segment_permutation(B, S, generator=g).to(device)
    fn = loss_fn(provider)

    def forward():
        u0, u2, y = (t.detach().requires_grad_() for t in inputs)  # fresh leaves: no gradient accumulates
        return fn(u0, u2, y, perm)

    def setup():  # bwd: the forward, outside the timed function
        loss = forward()
        sync(device)
        return (loss,), {}

    def timed(loss=None):
        if mode == "fwd":
            loss = forward()
        elif mode == "fwd_bwd":
            loss = forward()
            loss.backward()
        else:
            loss.backward()
        sync(device)
        return loss

    rounds, warmup = (20, 3) if B >= 4096 else (30, 3)
    if mode == "bwd":
        loss = benchmark.pedantic(timed, setup=setup, rounds=rounds, warmup_rounds=warmup, iterations=1)
        args, _ = setup()
        peak = peak_bytes(lambda: timed(*args), device)
    else:
        loss = benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)
        peak = peak_bytes(timed, device)
    if provider != "reference":
        assert K.last_backend("shuffle_rank") == provider.replace("_nocheck", "")
    ref = loss_fn("reference")(*inputs, perm)
    torch.testing.assert_close(loss.detach().float(), ref.float(), rtol=1e-4, atol=1e-5)
    benchmark.extra_info.update(provider=provider, device=device, mode=mode, B=B, s=S, d=D,
                                median_us=benchmark.stats.stats.median * 1e6, peak_MB=peak / 2**20)


def ratio_table(path: str) -> str:
    """Markdown table per device and mode: medians, peak MB, reference/provider and torch/provider."""
    import json
    rows = {}
    for b in json.load(open(path))["benchmarks"]:
        e = b["extra_info"]
        if e.get("s") == S and "mode" in e:
            rows[(e["device"], e["mode"], e["provider"], e["B"])] = (b["stats"]["median"], e["peak_MB"])
    lines = []
    for dev in sorted({k[0] for k in rows}):
        provs = [p for p in PROVIDERS[dev] if any(k[0] == dev and k[2] == p for k in rows)]
        others = [p for p in provs if p != "reference"]
        lines.append(f"\n{dev}: median ms (peak MB beyond the inputs); ratios of medians\n")
        lines.append("| mode | B | " + " | ".join(provs) + " | " + " | ".join(f"reference/{p}" for p in others)
                     + " | " + " | ".join(f"torch/{p}" for p in others if p != "torch") + " |")
        n_cols = len(provs) + len(others) + len([p for p in others if p != "torch"])
        lines.append("|---|---|" + "---|" * n_cols)
        for mode in MODES:
            for B in BATCHES:
                row = {p: rows.get((dev, mode, p, B)) for p in provs}
                if any(v is None for v in row.values()):
                    continue
                cells = [f"{row[p][0] * 1e3:.3f} ({row[p][1]:.2f})" for p in provs]
                cells += [f"{row['reference'][0] / row[p][0]:.2f}x" for p in others]
                cells += [f"{row['torch'][0] / row[p][0]:.2f}x" for p in others if p != "torch"]
                lines.append(f"| {mode} | {B} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # python bench/test_bench_shuffle_rank.py RESULT.json
    import sys
    print(ratio_table(sys.argv[1]))

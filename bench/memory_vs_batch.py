"""Peak memory and time of one training step as the global batch grows: (a) plain torch losses, (b) the fused
losses, (c) the fused losses with gradient caching (docs/benchmarks.md).

(a) computes the losses with the naive formulas (full 2N x 2N similarity matrices, kernels'
*_reference functions); (b) and (c) with the fused kernels (dualvar.engine.objectives).
Every measurement runs in a fresh subprocess (its own peak): one warm-up step, then timed steps; the step is
the trainer's (make_views on the uint8 batch -> SimCLR DualVar clip-sr-tc -> objective -> backward -> SGD step),
without the loader: the uint8 batch is generated in memory.

    CPU (recorded in bench/results/memory_vs_batch_cpu.md):
        python bench/memory_vs_batch.py --device cpu --threads 1 --batches 256 512 1024 2048 4096 --chunk 32 \
            --out bench/results/memory_vs_batch_cpu.md
    GPU (make gpu-check; R(2+1)D-10, 16x112x112, bf16): the largest global batch that fits one card for (a)
    and (b), then (c) at 16,384 clips (the goal: under 80 GB):
        python bench/memory_vs_batch.py --device cuda --backbone r2plus1d_10 --frames 16 --crop 112 \
            --precision bf16 --modes ab --search --start 64 --resolution 32 --max 8192 --repeat 1 \
            --out bench/results/memory_vs_batch_gpu.md
        python bench/memory_vs_batch.py --device cuda --backbone r2plus1d_10 --frames 16 --crop 112 \
            --precision bf16 --modes c --chunk 32 --batches 16384 --repeat 0 --timeout 420 \
            --out bench/results/memory_vs_batch_gpu.md --append

Peak memory: CPU, the subprocess's VmHWM (peak resident set, including the ~0.4 GB of torch and dualvar
themselves; "step" is VmHWM minus the resident set just before the first step); GPU,
torch.cuda.max_memory_allocated. With --search the batch doubles from --start until a step fails (out of
memory) or --max is reached, then bisects between the last fit and the first failure (to --resolution).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

MODES = {"a": "plain torch losses", "b": "fused losses", "c": "fused losses + gradient caching"}


def plain_objective(cfg):
    """(a): the DualVar objective written as plain torch on the full similarity matrices (the naive
    formulas the kernels are tested against: 2N x 2N logits for the clip and tc losses), same parts and
    total as the fused objective."""
    import torch

    from dualvar.kernels import nt_xent_loss_reference, shuffle_rank_loss_reference

    class Plain(torch.nn.Module):
        def forward(self, emb):
            clip = nt_xent_loss_reference(torch.cat([emb.z0, emb.z1]), cfg.tau)
            tc = nt_xent_loss_reference(torch.cat([emb.u0.mean(1), emb.u1.mean(1)]), cfg.tau_a)
            sr = sum(w * shuffle_rank_loss_reference(a, emb.y_shuf, emb.perm, cfg.theta, cap=cfg.cap)
                     for w, a in zip(cfg.sr_weights, (emb.u0, emb.u2)))
            return type("Out", (), {"total": clip + tc + sr})()

    return Plain()


# ----------------------------------------------------------------------------- one measurement (subprocess)
def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def measure(args) -> dict:
    import torch

    from dualvar.engine.frameworks import build_framework, make_views
    from dualvar.engine.grad_cache import GradCache
    from dualvar.engine.models import build_backbone
    from dualvar.engine.objectives import DualVarLossConfig, build_objective
    from dualvar.kernels import random_segment_permutation

    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    amp = {"fp32": None, "bf16": torch.bfloat16}[args.precision]
    model = build_framework("simclr", build_backbone(args.backbone, norm=args.norm), mode="clip-sr-tc").to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last_3d)
    model.train()
    loss_cfg = DualVarLossConfig(framework="simclr", mode="clip-sr-tc")
    objective = plain_objective(loss_cfg) if args.mode == "a" else build_objective(loss_cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    B, T, S = args.batch, args.frames, args.crop
    g = torch.Generator().manual_seed(1)  # random clips (a block of 256 repeated: 16k GPU-size clips are 30 GB)
    block = torch.randint(0, 256, (min(B, 256), 3, T, S, S, 3), dtype=torch.uint8, generator=g)
    batch = {"video": block.repeat(-(-B // block.shape[0]), 1, 1, 1, 1, 1)[:B]}
    perm_gen = torch.Generator(device=device).manual_seed(2)
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else None
    import contextlib
    autocast = autocast or contextlib.nullcontext
    view_args = dict(n_series=2, out_dtype=amp or torch.float32, backend="auto")
    chunk = args.chunk if args.mode == "c" else 0

    def step():
        if chunk and chunk < B:
            perm = random_segment_permutation(B, 2, generator=perm_gen)
            cache = GradCache(model, chunk, autocast=autocast)
            emb = cache.embed(B, lambda lo, hi: make_views({"video": batch["video"][lo:hi]}, device, generator=None,
                                                           perm=perm[lo:hi], **view_args))
            out = objective(emb)
            out.total.backward()
            cache.backward(emb)
        else:
            views, perm = make_views(batch, device, generator=perm_gen, **view_args)
            with autocast():
                emb = model(views, perm)
            out = objective(emb)
            out.total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.total.detach())

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else _status_bytes("VmRSS")
    times = []
    for i in range(1 + args.repeat):
        sync()
        t0 = time.perf_counter()
        loss = step()
        sync()
        if i or not args.repeat:  # --repeat 0: the one (cold) step is timed
            times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _status_bytes("VmHWM")
    times.sort()
    return {"mode": args.mode, "batch": B, "peak_bytes": peak, "step_bytes": peak - before, "before_bytes": before,
            "step_s": times[len(times) // 2], "step_s_min": times[0], "step_s_max": times[-1], "loss": loss,
            "chunk": chunk if chunk and chunk < B else 0}


# ----------------------------------------------------------------------------- driver
def run_one(args, mode: str, batch: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", "--mode", mode, "--batch", str(batch),
           "--device", args.device, "--backbone", args.backbone, "--norm", args.norm, "--frames", str(args.frames),
           "--crop", str(args.crop), "--precision", args.precision, "--chunk", str(args.chunk),
           "--repeat", str(args.repeat), "--threads", str(args.threads)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if p.returncode != 0:
        oom = "out of memory" in p.stderr.lower() or p.returncode in (-9, 137)
        return {"mode": mode, "batch": batch, "failed": "out of memory" if oom else p.stderr.strip()[-300:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def search(args, mode: str) -> tuple[dict, list]:
    """Largest batch that fits: doubling from --start, then bisection to --resolution."""
    tried, fit, fail = [], None, None
    b = args.start
    while b <= args.max:
        r = run_one(args, mode, b)
        tried.append(r)
        print(json.dumps(r), flush=True)
        if "failed" in r:
            fail = b
            break
        fit = r
        b *= 2
    while fit is not None and fail is not None and fail - fit["batch"] > args.resolution:
        mid = (fit["batch"] + fail) // 2
        r = run_one(args, mode, mid)
        tried.append(r)
        print(json.dumps(r), flush=True)
        if "failed" in r:
            fail = mid
        else:
            fit = r
    return fit, tried


def _fmt(r: dict) -> str:
    if "failed" in r:
        return f"| {r['mode']} | {r['batch']} | failed: {r['failed'][:60]} | | | |"
    mib = 2 ** 20
    return (f"| {r['mode']} | {r['batch']} | {r['peak_bytes'] / mib:.0f} | {r['step_bytes'] / mib:.0f} | "
            f"{r['step_s']:.2f} ({r['step_s_min']:.2f}-{r['step_s_max']:.2f}) | {r['loss']:.5f} |")


def header(args) -> list[str]:
    import torch
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'}, " \
        f"{os.cpu_count()} cores, {args.threads or torch.get_num_threads()} threads"
    return [f"# Memory and time of one training step vs the global batch ({args.device})", "",
            f"- date {time.strftime('%Y-%m-%d')}, git {rev}, torch {torch.__version__}, device: {dev}",
            f"- step: SimCLR DualVar clip-sr-tc, backbone {args.backbone} ({args.norm}), {args.frames}x{args.crop}x"
            f"{args.crop} clips (4 views per clip), {args.precision}, SGD; median of {args.repeat} steps after "
            "one warm-up, each batch size in a fresh subprocess",
            f"- modes: (a) {MODES['a']}, (b) {MODES['b']}, (c) {MODES['c']} in chunks of {args.chunk} clips",
            "- peak: " + ("torch.cuda.max_memory_allocated" if args.device == "cuda" else
                          "the subprocess's VmHWM (includes torch itself); step: peak minus the resident set "
                          "before the first step"),
            f"- command: `python bench/memory_vs_batch.py {' '.join(sys.argv[1:])}`", ""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--backbone", default="tiny")
    p.add_argument("--norm", default="bn")
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--crop", type=int, default=16)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--repeat", type=int, default=2, help="timed steps after the warm-up (0: time the one step)")
    p.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0: torch's default)")
    p.add_argument("--batches", type=int, nargs="*", default=[64, 128, 256, 512, 1024])
    p.add_argument("--modes", default="abc")
    p.add_argument("--search", action="store_true", help="find the largest batch that fits, per mode")
    p.add_argument("--start", type=int, default=64)
    p.add_argument("--max", type=int, default=65536)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", help="write the markdown table here")
    p.add_argument("--append", action="store_true", help="append to --out instead of replacing it")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args)))
        return 0
    lines = header(args)
    lines += ["| mode | global batch | peak MiB | step MiB | step s (min-max) | loss (last step) |",
              "|---|---|---|---|---|---|"]
    best = {}
    for mode in args.modes:
        if args.search:
            fit, tried = search(args, mode)
            best[mode] = fit
            lines += [_fmt(r) for r in tried]
        else:
            for b in args.batches:
                r = run_one(args, mode, b)
                print(json.dumps(r), flush=True)
                lines.append(_fmt(r))
    if args.search:
        lines += ["", "Largest global batch that fits: " + ", ".join(
            f"({m}) {best[m]['batch'] if best[m] else 'none'}" for m in args.modes)]
    if "c" in args.modes and args.norm == "bn":
        lines += ["", f"(c)'s loss is not (a)'s and (b)'s: with BatchNorm in train mode each chunk of {args.chunk} "
                  "clips is normalised with its own statistics (model.norm=frozen_bn or group makes the chunked "
                  "step equal the unchunked one)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a" if args.append else "w") as f:
            f.write(("\n" if args.append else "") + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

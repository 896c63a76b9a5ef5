"""A short pretraining of the paper's R(2+1)D-10 on a generated synthetic set: the whole training path on a GPU
(loader workers, one frame-permutation call per step, bf16 autocast, channels_last_3d, the fused loss kernels,
backward, SGD), timed.

    python bench/gpu_train.py --out RESULT.json                      # GPU: r2plus1d_10, 16 x 112 x 112, bf16
    python bench/gpu_train.py --out RESULT.json --device cpu --tiny  # CPU smoke run of the same script

Writes one JSON object: the settings, the kernel backends that ran, and over the steps after --warmup
(first steps: cuDNN autotuning, Triton compilation): median step time (views to optimizer step), median data
time (waiting for the loader), clips/s over their wall time (3 sampled clips per video), peak memory (CUDA
allocator; VmHWM on CPU), and the first and last losses. Exit status 1 if the run failed or a loss was
non-finite.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch


def settings(args) -> dict:
    if args.tiny:
        clip = dict(frames=8, stride=2, crop=56, size=64, long=85)
        synth = dict(synthetic_classes=4, synthetic_videos_per_class=8, synthetic_frames=24, synthetic_height=64,
                     synthetic_width=85)
        backbone = "tiny"
    else:
        clip = dict(frames=16, stride=4, crop=112, size=128, long=171)
        synth = dict(synthetic_classes=10, synthetic_videos_per_class=12, synthetic_frames=64,
                     synthetic_height=128, synthetic_width=171)
        backbone = args.backbone
    return {
        "name": "gpu_train",
        "data": dict(dataset="synthetic", root=args.root, holdout=0, batch_size=args.batch, num_workers=args.workers,
                     **clip, **synth),
        "model": dict(backbone=backbone, framework=args.framework, mode="clip-sr-tc", compile=args.compile,
                      channels_last="auto"),
        "loss": dict(backend=args.backend, queue_size=args.batch * 64),
        "optim": dict(name="sgd", lr=0.003, momentum=0.9, weight_decay=1e-4, schedule="constant"),
        "train": dict(epochs=1000, max_steps=args.steps, device=args.device, precision=args.precision, log_every=1,
                      progress=False, tensorboard=False),
        "checkpoint": dict(every_steps=0, keep=1),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny backbone and small clips (a CPU smoke run)")
    p.add_argument("--backbone", default="r2plus1d_10")
    p.add_argument("--framework", default="simclr", choices=("simclr", "moco"))
    p.add_argument("--batch", type=int, default=16, help="videos per step (x 4 views through the backbone)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--backend", default="auto", help="kernel backend of the views and losses")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    p.add_argument("--root", default=None, help="synthetic set folder (generated there if absent)")
    p.add_argument("--run-dir", default=None, help="run directory (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")
    tag = "tiny" if args.tiny else "set"
    args.root = args.root or os.path.join(tempfile.gettempdir(), f"dualvar-gpu-train-{tag}")

    from dualvar.engine.config import from_dict
    from dualvar.engine.trainer import Trainer, ensure_synthetic
    from dualvar.kernels import last_backend
    cfg = from_dict(settings(args))
    on_gpu = cfg.train.device != "cpu" and torch.cuda.is_available()
    name = torch.cuda.get_device_name() if on_gpu else (platform.processor() or platform.machine())
    result = {"settings": cfg.to_dict(), "device_name": name, "torch": torch.__version__, "ok": False}
    t0 = time.perf_counter()
    ensure_synthetic(cfg.data)
    result["synthetic_s"] = round(time.perf_counter() - t0, 1)
    run_dir = args.run_dir or tempfile.mkdtemp(prefix="dualvar-gpu-train-run-")
    try:
        trainer = Trainer(cfg, run_dir)
        summary = trainer.fit()
    except Exception as e:  # recorded in the JSON: the GPU check keeps going and reports it
        result["error"] = f"{type(e).__name__}: {e}"
        _write(args.out, result)
        print(result["error"], file=sys.stderr)
        return 1
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    timed = rows[args.warmup:]
    wall = sum(r["step_s"] + r["data_s"] for r in timed)
    nonfinite = [r["step"] for r in rows if "nonfinite" in r]
    result.update({
        "ok": not nonfinite and summary["steps"] == args.steps,
        "device": str(trainer.device), "autocast": str(trainer.amp_dtype),
        "channels_last_3d": cfg.model.channels_last == "always" or trainer.device.type == "cuda",
        "backends": {op: last_backend(op) for op in ("permute_frames", "contrastive", "shuffle_rank")},
        "batch": args.batch, "steps": summary["steps"], "timed_steps": len(timed),
        "step_s_median": statistics.median(r["step_s"] for r in timed),
        "data_s_median": statistics.median(r["data_s"] for r in timed),
        "clips_per_s": 3 * args.batch * len(timed) / wall,
        "peak_mem_mb": max(r["peak_mem_mb"] for r in rows),
        "first_step_s": rows[0]["step_s"], "wall_s": summary["wall_s"],
        "loss_first": rows[0]["total"], "loss_last": rows[-1]["total"], "nonfinite_steps": nonfinite,
        "parts_last": {k: rows[-1][k] for k in ("clip_nce", "tc_nce", "sr_rank_view0", "sr_rank_view2", "sr_accuracy")},
    })
    _write(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "settings"}, indent=1))
    return 0 if result["ok"] else 1


def _write(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())

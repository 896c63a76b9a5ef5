"""`dualvar demo` (`make demo`): DualVar working end to end on a CPU in a few minutes, on a synthetic set.

Stages (each announced with its elapsed time; the trainer and the evaluations show their own progress):
  1. the synthetic set of the `demo` preset (10 classes that differ only in temporal order, generated once
     into a cache folder, $DUALVAR_CACHE or ~/.cache/dualvar);
  2. DualVar pretraining: SimCLR + clip-sr-tc, tiny backbone, the `demo` preset for DEFAULT_EPOCHS epochs;
  3. the SimCLR baseline (clip loss only, `model.mode=baseline`) with the same budget: the same preset,
     seed, data order, steps and schedule;
  4. retrieval (recall@k) and the linear probe of both, and of (a) the same backbone randomly initialised
     (`random:tiny:SEED`, the very weights both runs start from), with the evaluation protocol of
     docs/method.md §6.2-6.3 at the demo's clip size (10 clips per video at the pretraining stride);
  5. one table (OUT/comparison.md and comparison.png, through `dualvar report`'s comparison), printed.

The numbers are whatever this run measures: nothing here is tuned to a result. The budget (epochs) was
chosen for time only: the whole demo, set-up excluded, must stay well under 10 minutes on a 2-core CPU.
Runs go to OUT/dualvar_clip-sr-tc, OUT/simclr_baseline and OUT/random_init (each with its own report.md);
a second demo replaces them (only folders that a demo created).

Threads: torch uses one intra-op thread by default (`--threads`). The tiny backbone's convolutions are small:
on 2 cores, two intra-op threads wait on each other and on the loader workers (measured up to 16x slower
per step on a shared 2-core machine), while one thread leaves the other core to the video decoding.
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import time
from typing import Callable, Optional, Sequence

DEFAULT_OUT = os.path.join("runs", "demo")
DEFAULT_EPOCHS = 20
MARKER = ".dualvar-demo"
RUNS = {"dualvar": "dualvar_clip-sr-tc", "baseline": "simclr_baseline", "random": "random_init"}

# --quick: a seconds-long smoke run (a 16-video set of 12 frames at 16 x 21, 2 steps, 2 clips per video)
QUICK_OVERRIDES = ["data.synthetic_classes=4", "data.synthetic_videos_per_class=4", "data.synthetic_frames=12",
                   "data.synthetic_height=16", "data.synthetic_width=21", "data.frames=4", "data.stride=2",
                   "data.crop=16", "data.size=16", "data.long=21", "data.batch_size=4", "data.num_workers=0",
                   "train.max_steps=2", "train.log_every=1", "train.tensorboard=false", "loss.queue_size=16",
                   "checkpoint.every_steps=0"]
QUICK_CLIPS = 2


class DemoError(RuntimeError):
    """The demo cannot run (e.g. its output folder holds something that a demo did not write)."""


def _prepare_dirs(out: str) -> dict:
    """OUT/<run> for each run, emptied if a previous demo made it; a folder of someone else's is refused."""
    os.makedirs(out, exist_ok=True)
    dirs = {}
    for key, name in RUNS.items():
        path = os.path.join(out, name)
        if os.path.exists(path):
            if not os.path.isfile(os.path.join(path, MARKER)):
                raise DemoError(f"{path} exists and was not written by `dualvar demo`; choose another --out")
            shutil.rmtree(path)
        os.makedirs(path)
        open(os.path.join(path, MARKER), "w").close()
        dirs[key] = path
    return dirs


def demo_configs(*, quick: bool = False, epochs: Optional[int] = None, threads: int = 1,
                 overrides: Sequence[str] = ()):
    """(DualVar config, baseline config): the `demo` preset, identical except model.mode."""
    from .config import load_config
    common = [f"train.epochs={epochs or DEFAULT_EPOCHS}", "model.backbone=tiny", "model.framework=simclr",
              f"train.cpu_threads={threads}"]
    common += (QUICK_OVERRIDES if quick else []) + list(overrides)
    dualvar = load_config("demo", common + ["name=demo_dualvar", "model.mode=clip-sr-tc"])
    baseline = load_config("demo", common + ["name=demo_simclr_baseline", "model.mode=baseline"])
    return dualvar, baseline


def random_init_spec(cfg) -> str:
    """`random:BACKBONE:SEED`: the backbone weights a pretraining run of `cfg` starts from."""
    return f"random:{cfg.model.backbone}:{cfg.train.seed}"


def run_demo(out: str = DEFAULT_OUT, *, quick: bool = False, epochs: Optional[int] = None, threads: int = 1,
             overrides: Sequence[str] = (), log: Callable[[str], None] = None) -> dict:
    """Run the whole demo; returns {"table": markdown, "report": path, "timings": {stage: s}, "results": ...}."""
    import torch

    from .evaluate import evaluate_linear_probe, evaluate_retrieval, setup_evaluation
    from .evaluate.report import compare_runs
    from .trainer import Trainer, ensure_synthetic

    def say(text: str) -> None:
        (log or (lambda s: print(s, file=sys.stderr, flush=True)))(text)

    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    timings: dict = {}
    cfg_dv, cfg_base = demo_configs(quick=quick, epochs=epochs, threads=threads, overrides=overrides)
    dirs = _prepare_dirs(out)
    stages = 5

    def stage(i: int, text: str) -> float:
        say(f"[demo {i}/{stages}, {time.perf_counter() - t_start:5.0f} s] {text}")
        return time.perf_counter()

    # 1. the synthetic set
    t = stage(1, "synthetic set (generated on first use)")
    index = ensure_synthetic(cfg_dv.data)
    timings["synthetic_set"] = time.perf_counter() - t
    say(f"    {index}")

    # 2-3. the two pretraining runs, same budget
    summaries = {}
    runs = (("dualvar", cfg_dv, "DualVar pretraining (SimCLR + clip-sr-tc)"),
            ("baseline", cfg_base, "SimCLR baseline pretraining (clip loss only)"))
    for i, (key, cfg, what) in enumerate(runs, 2):
        t = stage(i, f"{what}: tiny backbone, {cfg.train.epochs} epochs"
                  + (f" (at most {cfg.train.max_steps} steps)" if cfg.train.max_steps else "") + f", {dirs[key]}")
        trainer = Trainer(cfg, dirs[key])
        summaries[key] = trainer.fit()
        del trainer
        gc.collect()  # the trainer's loader workers stop now, before the evaluation loaders fork
        timings[f"pretrain_{key}"] = time.perf_counter() - t

    # 4. evaluations: retrieval + linear probe of the two runs and of the random init
    d = cfg_dv.data
    clips = dict(clips=QUICK_CLIPS if quick else 10, stride=d.stride)
    device = "cpu" if cfg_dv.train.device == "auto" and not torch.cuda.is_available() else \
        ("cuda" if cfg_dv.train.device == "auto" else cfg_dv.train.device)
    workers = 0 if quick else 1
    t = stage(4, "retrieval and linear probe: DualVar, SimCLR baseline, random init")
    sections = {}
    for key in ("dualvar", "baseline", "random"):
        run = dirs[key]
        if key == "random":
            ev = setup_evaluation(random_init_spec(cfg_dv), index, holdout=d.holdout,
                                  holdout_seed=d.holdout_seed, device=device,
                                  cache_dir=os.path.join(run, "eval_cache"), frames=d.frames, crop=d.crop,
                                  size=d.size, long=d.long, **clips)
        else:
            ev = setup_evaluation(run, index, device=device, cache_dir=os.path.join(run, "eval_cache"), **clips)
        say(f"    {RUNS[key]}")
        ret = evaluate_retrieval(ev, run, batch_size=8, num_workers=workers, progress=True)
        probe = evaluate_linear_probe(ev, run, batch_size=8, num_workers=workers, progress=False)
        sections[key] = {"recall": ret["recall"], "probe_top1": probe["top1"], "probe_top5": probe["top5"]}
    timings["evaluation"] = time.perf_counter() - t

    # 5. one table
    t = stage(5, "comparison table")
    md, png = compare_runs([dirs["dualvar"], dirs["baseline"], dirs["random"]], out)
    timings["table"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    steps = summaries["dualvar"]["steps"]
    note = (f"\nDemo: the synthetic set ({d.synthetic_classes} classes told apart only by temporal order, "
            f"{len(ev.train)} train / {len(ev.test)} test videos), tiny backbone, both runs {steps} steps "
            f"({summaries['dualvar']['epochs_done']:.3g} epochs of batch {d.batch_size}, seed {cfg_dv.train.seed}); "
            f"evaluation "
            f"{clips['clips']} clips of {d.frames} frames at stride {d.stride} per video, queries = test, "
            f"gallery = train, linear probe trained on train. Random init = the weights both runs start from. "
            f"Wall time {timings['total']:.0f} s on {torch.get_num_threads()} torch thread(s)"
            f" ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items() if k != 'total')}).\n")
    report = os.path.join(out, "comparison.md")
    with open(report, "a") as f:
        f.write(note)
    result = {"table": md, "report": os.path.abspath(report), "plot": png, "timings": timings, "results": sections,
              "steps": steps, "quick": quick, "threads": torch.get_num_threads(), "runs": dirs}
    with open(os.path.join(out, "demo.json"), "w") as f:
        json.dump({k: v for k, v in result.items() if k != "table"}, f, indent=1)
    print(md.split("\n![")[0].rstrip())
    print(note.strip())
    print(f"report: {os.path.abspath(report)}")
    return result

"""A small ablation on the demo's synthetic set: SimCLR and MoCo x baseline / clip-sr / clip-sr-tc x seeds.

    .venv/bin/python bench/ablation.py [--epochs 10] [--seeds 0 1 2] [--out-dir runs/ablation]
                                       [--results bench/results/ablation_synthetic.md]

Every run is the `demo` preset (tiny backbone, 10 classes told apart only by temporal order) with the given
framework, mode, seed and epochs, pretrained on the CPU (one torch thread), then evaluated exactly as
`dualvar demo` evaluates: retrieval recall@k (test queries, train gallery, 10 clips at the pretraining
stride, per-set mean-centring) and the linear probe (top-1) on frozen features. The random init of each seed
(the weights its runs start from) is evaluated too. The markdown file gets the mean, the sample standard
deviation and the range over seeds of R@1, R@5 and probe top-1, every run's numbers, and the command, date,
revision and wall times. Finished runs are kept in OUT_DIR/rows.jsonl and skipped when the script is run
again with the same settings (delete the folder to start over).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time

FRAMEWORKS = ("simclr", "moco")
MODES = ("baseline", "clip-sr", "clip-sr-tc")


def _evaluate(checkpoint: str, run_dir: str, index: str, data, *, random_init: bool) -> dict:
    from dualvar.engine.evaluate import evaluate_linear_probe, evaluate_retrieval, setup_evaluation
    kw = dict(clips=10, stride=data.stride, device="cpu", cache_dir=os.path.join(run_dir, "eval_cache"))
    if random_init:
        kw.update(holdout=data.holdout, holdout_seed=data.holdout_seed, frames=data.frames, crop=data.crop,
                  size=data.size, long=data.long)
    ev = setup_evaluation(checkpoint, index, **kw)
    ret = evaluate_retrieval(ev, run_dir, batch_size=8, num_workers=1)
    probe = evaluate_linear_probe(ev, run_dir, batch_size=8, num_workers=1)
    return {"r1": ret["recall"][1], "r5": ret["recall"][5], "r10": ret["recall"][10], "probe_top1": probe["top1"],
            "probe_top5": probe["top5"], "queries": ret["queries"], "gallery": ret["gallery"],
            "classes": len(ev.info["class_names"])}


def run_config(framework: str, mode: str, seed: int, epochs: int):
    """The `demo` preset with this run's framework, mode, seed and epochs (random init: the preset's model)."""
    from dualvar.engine.config import load_config
    name = "random_init" if framework == "random" else f"{framework}_{mode}"
    overrides = [f"train.epochs={epochs}", f"train.seed={seed}", "train.progress=false", "train.tensorboard=false",
                 "checkpoint.every_steps=0", f"name=ablation_{name}_seed{seed}"]
    if framework != "random":
        overrides += [f"model.framework={framework}", f"model.mode={mode}"]
    return load_config("demo", overrides)


def settings_key(cfg) -> str:
    """What every run of one ablation shares: the resolved config without name, seed, framework and mode."""
    d = cfg.to_dict()
    d.pop("name")
    d["train"] = {k: v for k, v in d["train"].items() if k != "seed"}
    d["model"] = {k: v for k, v in d["model"].items() if k not in ("framework", "mode")}
    return json.dumps(d, sort_keys=True)


def run_one(framework: str, mode: str, seed: int, epochs: int, out_dir: str) -> dict:
    """Pretrain one setting (or evaluate the random init: framework "random") and evaluate it."""
    from dualvar.engine.trainer import Trainer, ensure_synthetic
    name = "random_init" if framework == "random" else f"{framework}_{mode}"
    run_dir = os.path.join(out_dir, f"{name}_seed{seed}")
    cfg = run_config(framework, mode, seed, epochs)
    index = ensure_synthetic(cfg.data)
    t0 = time.perf_counter()
    row = {"framework": framework, "mode": mode, "seed": seed, "epochs": epochs}
    if framework == "random":
        os.makedirs(run_dir, exist_ok=True)
        row.update(_evaluate(f"random:{cfg.model.backbone}:{seed}", run_dir, index, cfg.data, random_init=True))
        row.update(steps=0, pretrain_s=0.0)
    else:
        trainer = Trainer(cfg, run_dir)
        summary = trainer.fit()
        del trainer
        gc.collect()  # stop the loader workers before the evaluation forks its own
        row.update(steps=summary["steps"], pretrain_s=summary["wall_s"], nonfinite_steps=summary["nonfinite_steps"])
        row.update(_evaluate(run_dir, run_dir, index, cfg.data, random_init=False))
    row["wall_s"] = time.perf_counter() - t0
    row["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    row["settings"] = settings_key(cfg)
    return row


def _stats(values: list) -> str:
    pct = [100 * v for v in values]
    mean = statistics.fmean(pct)
    sd = statistics.stdev(pct) if len(pct) > 1 else float("nan")
    return f"{mean:.1f} ± {sd:.1f} [{min(pct):.1f}, {max(pct):.1f}]"


def write_markdown(rows: list, path: str, *, command: str, started: str, wall_s: float, epochs: int,
                   seeds: list) -> str:
    import torch

    from dualvar.engine.demo import DEFAULT_EPOCHS
    from dualvar.engine.export import git_revision
    cfg = run_config("simclr", "clip-sr-tc", seeds[0], epochs)
    d, o = cfg.data, cfg.optim
    optim = (f"{o.name.upper() if o.name == 'sgd' else 'AdamW'} lr {o.lr:g}, weight decay {o.weight_decay:g}, "
             f"{o.schedule} schedule" + (f", {o.warmup_epochs:g} warm-up epoch(s)" if o.warmup_epochs else ""))
    finished = sorted(r.get("finished", "") for r in rows if r.get("finished"))
    from dualvar.engine.data.sampling import eval_indices
    idx = eval_indices(d.synthetic_frames, d.frames, d.stride, 10)
    distinct = len({tuple(i) for i in idx.tolist()})
    coverage = (f"frames {idx.min()}-{idx.max()} of each {d.synthetic_frames}-frame video, {distinct} distinct "
                f"clip(s) of the 10 (centres as docs/method.md §6.2 places them); a class is the order of two "
                f"motions, one per half of the video (the halves meet at frame {d.synthetic_frames // 2})")
    steps = sorted({r["steps"] for r in rows if r["framework"] != "random"})
    first = rows[0]
    lines = [
        "# Ablation on the synthetic set (CPU, tiny backbone)",
        "",
        "Baseline (clip loss only), clip-sr (+ shuffle-rank) and clip-sr-tc (+ temporal-coherent loss, the full "
        "method) for SimCLR and MoCo, each pretrained from the same random init per seed, then evaluated with "
        "frozen features as `dualvar demo` does. Numbers: mean ± sample standard deviation [min, max] over "
        f"seeds {', '.join(map(str, seeds))}, in %. Chance: 1/{first['classes']} = {100 / first['classes']:.1f}% "
        "for R@1 and probe top-1.",
        "",
        f"- command: `{command}`",
        f"- date: {started}" + (f" (runs finished {finished[0]} to {finished[-1]})" if finished else ""),
        f"- git revision: {git_revision()}",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other "
        f"jobs), torch {torch.__version__}, 1 torch thread, loader workers {d.num_workers}",
        f"- data: the `demo` preset's synthetic set, {d.synthetic_classes} classes x {d.synthetic_videos_per_class} "
        f"videos of {d.synthetic_frames} frames at {d.synthetic_height}x{d.synthetic_width}; "
        f"{first['gallery']} train (gallery, probe training) / {first['queries']} test (queries) videos",
        f"- budget per run: {epochs} epochs = {', '.join(map(str, steps))} steps of batch {d.batch_size} "
        f"({d.frames} frames at stride {d.stride}, {d.crop} crop), the `demo` preset's optimiser ({optim}); "
        f"`dualvar demo` trains {DEFAULT_EPOCHS} epochs",
        "- evaluation: 10 clips per video at the pretraining stride, retrieval with per-set mean-centring and "
        "cosine similarity; linear probe by full-batch L-BFGS on standardised features",
        f"- evaluation clips on this set: {coverage}",
        f"- total wall time: {wall_s / 60:.1f} min (one run at a time, on a machine shared with other jobs)",
        "",
        "| framework | mode | runs | R@1 | R@5 | probe top-1 | pretrain s / run |",
        "|---|---|---|---|---|---|---|",
    ]
    groups = [("random", "-")] + [(f, m) for f in FRAMEWORKS for m in MODES]
    for f, m in groups:
        g = [r for r in rows if r["framework"] == f and (f == "random" or r["mode"] == m)]
        if not g:
            continue
        label = ("random init", "-") if f == "random" else (f, m)
        lines.append(f"| {label[0]} | {label[1]} | {len(g)} | {_stats([r['r1'] for r in g])} | "
                     f"{_stats([r['r5'] for r in g])} | {_stats([r['probe_top1'] for r in g])} | "
                     f"{statistics.fmean(r['pretrain_s'] for r in g):.0f} |")
    lines += ["", f"Reading: {first['queries']} queries, so one query is {100 / first['queries']:.1f} points of "
              "R@1 and probe top-1; differences within the seed spread are not evidence either way."]
    if len({r.get("settings") for r in rows}) > 1:
        lines += ["", "**Warning:** the runs above do not all share one configuration (the `demo` preset changed "
                  "while the ablation ran); compare with care."]
    lines += ["", "## Every run", "", "| framework | mode | seed | steps | R@1 | R@5 | R@10 | probe top-1 | "
              "probe top-5 | wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["framework"] != "random", r["framework"], MODES.index(r["mode"])
                                         if r["mode"] in MODES else -1, r["seed"])):
        lines.append(f"| {r['framework']} | {r['mode']} | {r['seed']} | {r['steps']} | {100 * r['r1']:.1f} | "
                     f"{100 * r['r5']:.1f} | {100 * r['r10']:.1f} | {100 * r['probe_top1']:.1f} | "
                     f"{100 * r['probe_top5']:.1f} | {r['wall_s']:.0f} |")
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=10, help="pretraining epochs per run (default 10)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS), choices=FRAMEWORKS)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--out-dir", default=os.path.join("runs", "ablation"))
    p.add_argument("--results", default=os.path.join("bench", "results", "ablation_synthetic.md"))
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    command = " ".join(["python bench/ablation.py"] + [shlex.quote(a) for a in (argv if argv is not None
                                                                                else sys.argv[1:])])
    started = datetime.datetime.now().isoformat(timespec="seconds")
    os.makedirs(args.out_dir, exist_ok=True)
    rows_path = os.path.join(args.out_dir, "rows.jsonl")
    done = []
    if os.path.isfile(rows_path):
        with open(rows_path) as f:
            done = [json.loads(line) for line in f if line.strip()]
    keys = {(f, m, s): settings_key(run_config(f, m, s, args.epochs)) for f in ("random",) + FRAMEWORKS
            for m in (("-",) if f == "random" else MODES) for s in args.seeds}
    done = [r for r in done if r.get("settings") == keys.get((r["framework"], r["mode"], r["seed"]))]
    jobs = [("random", "-", s) for s in args.seeds] + [(f, m, s) for s in args.seeds for f in args.frameworks
                                                       for m in args.modes]
    t0 = time.perf_counter()
    rows = []
    for i, (f, m, s) in enumerate(jobs, 1):
        old = next((r for r in done if (r["framework"], r["mode"], r["seed"]) == (f, m, s)), None)
        if old is not None:
            rows.append(old)
            continue
        print(f"[{i}/{len(jobs)}, {time.perf_counter() - t0:5.0f} s] {f} {m} seed {s}", flush=True)
        row = run_one(f, m, s, args.epochs, args.out_dir)
        print(f"    R@1 {100 * row['r1']:.1f}  probe top-1 {100 * row['probe_top1']:.1f}  ({row['wall_s']:.0f} s)",
              flush=True)
        rows.append(row)
        with open(rows_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
    wall = time.perf_counter() - t0 + sum(r["wall_s"] for r in rows if r in done)
    print(write_markdown(rows, args.results, command=command, started=started, wall_s=wall, epochs=args.epochs,
                         seeds=args.seeds))
    print(f"written to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

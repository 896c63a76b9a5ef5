"""`dualvar retrieve`, `dualvar linear-probe` and `dualvar report`: each an add_*(subparsers) registering
its arguments and a run function returning the exit status.

    dualvar retrieve --checkpoint RUN_DIR_OR_SAFETENSORS [--index INDEX.jsonl] [--split 1] [--no-centre]
    dualvar linear-probe --checkpoint RUN_DIR_OR_SAFETENSORS [--index INDEX.jsonl] [--split 1]
    dualvar report RUN_DIR [RUN_DIR ...] [--out DIR]
    dualvar finetune --config PRESET_OR_YAML --checkpoint RUN_DIR_OR_SAFETENSORS [--index INDEX] [--split N]
                     [--run-dir DIR] [--resume auto|none|PATH] [--test-only] [key.path=value ...]
    dualvar demo [--out DIR] [--quick] [--epochs N] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import sys


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="pretraining run directory (its newest readable checkpoint), a .safetensors file from "
                        "`dualvar export`, or random:BACKBONE[:SEED] for a randomly initialised backbone")
    p.add_argument("--index", help="dataset index (JSONL, `dualvar data index`); default: the run's own")
    p.add_argument("--split", type=int, default=1, help="the dataset split number the index was built for "
                   "(recorded; the paper's numbers are for split 1)")
    p.add_argument("--test-split", default="test", help="index split of the test videos (queries)")
    p.add_argument("--out", help="where results.json, report.md and the plots go (default: the run directory, "
                   "or the exported file's folder)")
    p.add_argument("--holdout", type=int, help="train videos held out of the gallery / probe training set "
                   "(default: the run's data.holdout, else 800)")
    p.add_argument("--holdout-seed", type=int, help="seed of the hold-out draw (default: the run's, else 666)")
    g = p.add_argument_group("clips (default: the protocol's 10 clips at stride 4; frames, crop and decode size "
                             "from the checkpoint)")
    g.add_argument("--clips", type=int, default=10, help="clips per video, averaged")
    g.add_argument("--stride", type=int, default=4, help="frame stride ds within a clip")
    g.add_argument("--frames", type=int, help="frames per clip T")
    g.add_argument("--crop", type=int, help="centre crop side")
    g.add_argument("--size", type=int, help="decode height")
    g.add_argument("--long", type=int, help="decode width")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, default=8, help="videos per forward batch (x clips)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="video reading processes")
    p.add_argument("--video-backend", default="auto", choices=("auto", "decord", "pyav"))
    p.add_argument("--cache-dir", help="feature cache folder (default: RUN_DIR/eval_cache, or beside the file)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached features")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def _setup(args: argparse.Namespace):
    from .features import default_out_dir, setup_evaluation
    ev = setup_evaluation(args.checkpoint, args.index, holdout=args.holdout, holdout_seed=args.holdout_seed,
                          test_split=args.test_split, device=args.device, cache_dir=args.cache_dir,
                          use_cache=not args.no_cache, clips=args.clips, stride=args.stride, frames=args.frames,
                          crop=args.crop, size=args.size, long=args.long)
    return ev, args.out or default_out_dir(args.checkpoint)


def _errors():
    from ..checkpoint import CheckpointError
    from ..config import ConfigError
    return (FileNotFoundError, ValueError, CheckpointError, ConfigError)


def _fail(command: str, e: Exception) -> int:
    print(f"dualvar {command}: {e}", file=sys.stderr)
    return 2


# ----------------------------------------------------------------------------- retrieve
def run_retrieve(args: argparse.Namespace) -> int:
    from .retrieval import evaluate_retrieval
    try:
        ev, out = _setup(args)
        sec = evaluate_retrieval(ev, out, split=args.split, ks=args.ks, centre=not args.no_centre,
                                 chunk_size=args.chunk_size, batch_size=args.batch_size, num_workers=args.workers,
                                 video_backend=args.video_backend, progress=not args.quiet)
    except _errors() as e:
        return _fail("retrieve", e)
    recall = "  ".join(f"R@{k} {100 * v:.1f}" for k, v in sec["recall"].items())
    print(f"retrieval ({sec['queries']} queries, {sec['gallery']} gallery videos): {recall}")
    if sec["queries_without_feature"] or sec["gallery_without_feature"]:
        print(f"unreadable: {sec['queries_without_feature']} queries (counted as misses), "
              f"{sec['gallery_without_feature']} gallery videos")
    print(f"report: {os.path.join(out, 'report.md')}")
    return 0


def add_retrieve(sub) -> None:
    p = sub.add_parser("retrieve", help="nearest-neighbour video retrieval, recall@k (test queries vs train gallery)",
                       description="Retrieval protocol of docs/method.md §6.3: pooled backbone features averaged "
                                   "over 10 clips, per-set mean-centring, L2 normalisation, cosine similarity.")
    _add_common(p)
    p.add_argument("--no-centre", action="store_true", help="do not subtract each set's mean feature")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10, 20, 50], help="recall cut-offs")
    p.add_argument("--chunk-size", type=int, default=1024, help="rows per block of the similarity search")
    p.set_defaults(func=run_retrieve)


# ----------------------------------------------------------------------------- linear-probe
def run_linear_probe(args: argparse.Namespace) -> int:
    from .linear_probe import evaluate_linear_probe
    try:
        ev, out = _setup(args)
        sec = evaluate_linear_probe(ev, out, split=args.split, weight_decay=args.weight_decay,
                                    max_iter=args.max_iter, batch_size=args.batch_size, num_workers=args.workers,
                                    video_backend=args.video_backend, progress=not args.quiet)
    except _errors() as e:
        return _fail("linear-probe", e)
    print(f"linear probe ({sec['trained_on']} train, {sec['tested']} test videos): top-1 {100 * sec['top1']:.1f}  "
          f"top-{sec['top5_k']} {100 * sec['top5']:.1f}")
    if sec["without_feature"] or sec["train_without_feature"]:
        print(f"unreadable: {sec['without_feature']} test videos (counted as wrong), "
              f"{sec['train_without_feature']} train videos (not used)")
    print(f"report: {os.path.join(out, 'report.md')}")
    return 0


def add_linear_probe(sub) -> None:
    p = sub.add_parser("linear-probe", help="linear classifier on frozen multi-clip features, top-1/top-5",
                       description="Frozen backbone features (averaged over clips, cached), a linear classifier "
                                   "fitted by full-batch L-BFGS on the train split, top-1/top-5 on the test split.")
    _add_common(p)
    p.add_argument("--weight-decay", type=float, default=1e-3, help="L2 penalty on the classifier weights")
    p.add_argument("--max-iter", type=int, default=300, help="L-BFGS iterations")
    p.set_defaults(func=run_linear_probe)


# ----------------------------------------------------------------------------- report
def run_report(args: argparse.Namespace) -> int:
    from .report import compare_runs, write_report
    try:
        if len(args.run_dirs) == 1 and not args.out:
            if not os.path.isdir(args.run_dirs[0]):
                raise FileNotFoundError(f"run directory not found: {args.run_dirs[0]}")
            print(f"report: {write_report(args.run_dirs[0])}")
            return 0
        out = args.out or "report"
        md, _ = compare_runs(args.run_dirs, out)
    except (FileNotFoundError, ValueError) as e:
        return _fail("report", e)
    print(md)
    print(f"written to {os.path.join(out, 'comparison.md')}")
    return 0


def add_report(sub) -> None:
    p = sub.add_parser("report", help="refresh a run's report.md and plots; several runs: one table and one plot",
                       description="One RUN_DIR: (re)write RUN_DIR/report.md and its plots. Several (or --out): "
                                   "also a side-by-side comparison.md and comparison.png in --out.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="folder of the comparison (default: ./report when several runs are given)")
    p.set_defaults(func=run_report)


# ----------------------------------------------------------------------------- finetune
def run_finetune(args: argparse.Namespace) -> int:
    from ..checkpoint import CheckpointError, list_checkpoints
    from ..config import ConfigError
    from ..trainer import NonFiniteLossError
    from .finetune import FineTuner, load_finetune_config
    overrides = list(args.overrides)
    for flag, key in ((args.checkpoint, "model.checkpoint"), (args.index, "data.index"), (args.split, "data.split"),
                      (args.resume, "checkpoint.resume")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    try:
        cfg = load_finetune_config(args.config, overrides)
        run_dir = args.run_dir or os.path.join("runs", f"{cfg.name}_split{cfg.data.split}")
        has_ckpt = bool(list_checkpoints(os.path.join(run_dir, "checkpoints")))
        if args.test_only:
            if not has_ckpt and cfg.checkpoint.resume in ("none", "auto"):
                raise ConfigError(f"--test-only: {run_dir} holds no fine-tuning checkpoint")
            tuner = FineTuner(cfg, run_dir)
            tuner.resume("auto" if cfg.checkpoint.resume == "none" else cfg.checkpoint.resume)
            sec = tuner.test()
        else:
            if cfg.checkpoint.resume == "none" and has_ckpt:
                raise ConfigError(f"{run_dir} already holds checkpoints: pass --resume auto to continue that run, "
                                  "or choose another --run-dir")
            sec = FineTuner(cfg, run_dir).fit()
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"dualvar finetune: {e}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, CheckpointError) as e:
        print(f"dualvar finetune: {e}", file=sys.stderr)
        return 1
    if "top1" in sec:
        print(f"fine-tuned ({sec['tested']} test videos, {cfg.test.clips} clips each): top-1 {100 * sec['top1']:.1f}  "
              f"top-{sec['top5_k']} {100 * sec['top5']:.1f}")
        if sec["without_feature"]:
            print(f"unreadable: {sec['without_feature']} test videos (counted as wrong)")
        print(f"report: {os.path.join(run_dir, 'report.md')}")
    return 0


def add_finetune(sub) -> None:
    presets = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "finetune")
    names = sorted(f[:-5] for f in os.listdir(presets) if f.endswith(".yaml")) if os.path.isdir(presets) else []
    p = sub.add_parser("finetune", help="fine-tune the whole pretrained network + a linear classifier, 10-clip test",
                       description="Fine-tuning protocol of docs/method.md §5.2 and §6.2, from a preset "
                                   f"({', '.join(names)}) or a YAML file, with dotted overrides "
                                   "(e.g. optim.lr=0.01 train.epochs=5).")
    p.add_argument("--config", required=True, help="preset name (engine/configs/finetune/NAME.yaml) or a YAML file")
    p.add_argument("--checkpoint", help="pretraining run directory, a .safetensors file from `dualvar export`, or "
                   "random:BACKBONE[:SEED]; same as model.checkpoint=...")
    p.add_argument("--index", help="dataset index (JSONL, `dualvar data index --split N`); same as data.index=...")
    p.add_argument("--split", type=int, help="the dataset split (1-3) the index was built for; fills {split} in the "
                   "preset's index path; same as data.split=...")
    p.add_argument("--run-dir", help="run directory (default: runs/<config name>_split<N>)")
    p.add_argument("--resume", help="auto (the newest checkpoint of the run directory that loads), none, or a "
                   "checkpoint path; same as checkpoint.resume=...")
    p.add_argument("--test-only", action="store_true", help="only run the 10-clip test of the run directory's newest "
                   "checkpoint (or of --resume PATH)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides (values read as YAML)")
    p.set_defaults(func=run_finetune)


# ----------------------------------------------------------------------------- demo
def run_demo(args: argparse.Namespace) -> int:
    from ..config import ConfigError
    from ..demo import DemoError, run_demo as demo
    try:
        demo(out=args.out, quick=args.quick, epochs=args.epochs, threads=args.threads, overrides=args.overrides)
    except (ConfigError, DemoError, FileNotFoundError, ValueError) as e:
        print(f"dualvar demo: {e}", file=sys.stderr)
        return 2
    return 0


def add_demo(sub) -> None:
    from ..demo import DEFAULT_EPOCHS, DEFAULT_OUT
    p = sub.add_parser("demo", help="a few minutes on a CPU: DualVar vs SimCLR vs random init on a synthetic set",
                       description="Generate the synthetic set, pretrain DualVar (SimCLR, clip-sr-tc) and the SimCLR "
                                   "baseline (clip loss only) with the same budget on the tiny backbone, then "
                                   "retrieval and the linear probe of both and of a random init; prints one table.")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"folder of the three runs and the table (default {DEFAULT_OUT})")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tiny set, 2 steps): for tests")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"pretraining epochs of each of the two runs (default {DEFAULT_EPOCHS})")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: tiny convolutions "
                   "are fastest on one thread, and the loader workers use the other core)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="pretraining config overrides applied to both runs (e.g. train.device=cuda)")
    p.set_defaults(func=run_demo)


COMMANDS = (add_retrieve, add_linear_probe, add_report, add_finetune, add_demo)

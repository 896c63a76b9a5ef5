"""`dualvar data index|synth|bench`."""
from __future__ import annotations

import argparse
import json
import sys
import time


def _index(args: argparse.Namespace) -> int:
    from .index import build_index, format_summary
    try:
        result = build_index(args.dataset, args.root, args.out, splits=args.splits, list_file=args.list,
                             split=args.split, clip_span=(args.clip_frames - 1) * args.stride + 1,
                             workers=args.workers, backend=args.backend)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"dualvar data index: {e}", file=sys.stderr)
        return 2
    print(format_summary(result["summary"]))
    print(f"probed {result['probed']} files (the rest from the cache); index written to {args.out}")
    return 0


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HxW, e.g. 128x171, got {text!r}") from None
    return h, w


def _synth(args: argparse.Namespace) -> int:
    from .synthetic import write_synthetic_dataset
    t0 = time.perf_counter()
    h, w = args.size
    info = write_synthetic_dataset(args.out, classes=args.classes, videos_per_class=args.videos_per_class,
                                   frames=args.frames, height=h, width=w, seed=args.seed, workers=args.workers)
    print(f"wrote {len(info['train']) + len(info['test'])} videos ({len(info['classes'])} classes, "
          f"train {len(info['train'])}, test {len(info['test'])}) to {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import bench_loader, ensure_synthetic_index
    index = ensure_synthetic_index(args.root)
    rows = []
    for w in args.workers:
        r = bench_loader(index, num_workers=w, batch_size=args.batch_size, batches=args.batches,
                         device=args.device, augment_colour=not args.no_colour)
        rows.append(r)
        print(f"[{r['backend']}] workers {w}: {r['clips_per_s']:.1f} clips/s ({r['videos_per_s']:.1f} videos/s), "
              f"decode+crop {r['decode_share']:.0%} / device augmentation {r['augment_share']:.0%} "
              f"of single-process time; loop: waiting for batches {r['loop_wait_share']:.0%}, "
              f"augmenting {r['loop_augment_share']:.0%}"
              + (f"; FAILED READS {r['failures']}" if r["failures"] else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def add_data_commands(subparsers) -> None:
    """Add `data` with sub-commands index, synth and bench to the `dualvar` parser."""
    data = subparsers.add_parser("data", help="dataset indexes, synthetic videos, loader benchmark")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("index", help="list and probe a dataset's videos and write an index (JSONL)")
    p.add_argument("--dataset", required=True, choices=("ucf101", "hmdb51", "kinetics400", "list"))
    p.add_argument("--root", required=True, help="folder holding the videos")
    p.add_argument("--splits", help="split files folder (UCF101/HMDB51 default: inside root) or Kinetics CSV(s)")
    p.add_argument("--list", help="generic dataset: file with 'path label' lines")
    p.add_argument("--split", type=int, default=1, choices=(1, 2, 3), help="UCF101/HMDB51 split number")
    p.add_argument("--out", required=True, help="index file to write (JSONL); probes are cached beside it")
    p.add_argument("--clip-frames", type=int, default=16, help="T, for the 'shorter than one clip' count")
    p.add_argument("--stride", type=int, default=4, help="ds, for the 'shorter than one clip' count")
    p.add_argument("--workers", type=int, default=None, help="parallel probes (default: CPU count, max 8)")
    p.add_argument("--backend", default="auto", choices=("auto", "decord", "pyav"))
    p.set_defaults(func=_index)

    p = sub.add_parser("synth", help="write the synthetic video set in UCF101's layout")
    p.add_argument("--out", required=True)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--videos-per-class", type=int, default=30)
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--size", type=_parse_size, default=(128, 171), help="HxW (default 128x171)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    p.set_defaults(func=_synth)

    p = sub.add_parser("bench", help="clips/s of the pretraining loader for several worker counts")
    p.add_argument("--root", default=None, help="synthetic set folder (written there if absent; default: a "
                   "temporary folder)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-colour", action="store_true",
                   help="skip colour jitter and blur (decode + crop + transfer + layout/normalise only)")
    p.add_argument("--json", help="also write the results here")
    p.set_defaults(func=_bench)

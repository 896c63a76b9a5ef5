"""The `dualvar` command: a list of thin subcommands, each an `add_parser(subparsers)` that registers its
arguments and its `run(args) -> exit status`.

    dualvar info
    dualvar data index|synth|bench ...
    dualvar pretrain --config PRESET_OR_YAML [--run-dir DIR] [--resume auto|none|PATH] [key.path=value ...]
    torchrun --nproc_per_node=N -m dualvar.engine.cli pretrain ...     (N processes, DDP; README)
    dualvar export RUN_DIR --out model.safetensors [--checkpoint PATH]
    dualvar retrieve|linear-probe|report|finetune|demo ...   (engine/evaluate/cli.py)
"""
from __future__ import annotations

import argparse
import os
import sys

from dualvar.engine.data.cli import add_data_commands
from dualvar.engine.evaluate.cli import COMMANDS as EVALUATE_COMMANDS


# ----------------------------------------------------------------------------- info
def _run_info(args: argparse.Namespace) -> int:
    from dualvar.kernels.info import report
    print(report())
    return 0


def add_info(sub) -> None:
    p = sub.add_parser("info", help="versions, device, built and available kernel backends")
    p.set_defaults(func=_run_info)


# ----------------------------------------------------------------------------- pretrain
def _run_pretrain(args: argparse.Namespace) -> int:
    from . import distributed
    from .checkpoint import CheckpointError, list_checkpoints
    from .config import ConfigError, load_config
    from .data import DataFailureError
    from .trainer import DatasetMissingError, NonFiniteLossError, Trainer
    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    where = ""
    try:
        cfg = load_config(args.config, overrides)
        # under torchrun: join the process group (NCCL on GPUs, gloo on the CPU); otherwise one process
        try:
            ctx = distributed.init_from_env(cfg.train.device)
        except ValueError as e:
            raise ConfigError(f"train.device / the torchrun environment: {e}") from None
        where = f" (rank {ctx.rank} of {ctx.world_size})" if ctx.distributed else ""
        run_dir = args.run_dir or os.path.join("runs", cfg.name)
        if cfg.checkpoint.resume == "none" and list_checkpoints(os.path.join(run_dir, "checkpoints")):
            raise ConfigError(f"{run_dir} already holds checkpoints: pass --resume auto to continue that run, "
                              "or choose another --run-dir")
        summary = Trainer(cfg, run_dir, rank=ctx.rank, world_size=ctx.world_size, device=ctx.device).fit()
    except (ConfigError, DatasetMissingError) as e:
        print(f"dualvar pretrain{where}: {e}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, CheckpointError, DataFailureError) as e:
        print(f"dualvar pretrain{where}: {e}", file=sys.stderr)
        return 1
    finally:
        distributed.teardown()
    return 0 if summary["steps"] > 0 else 1


def add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="self-supervised DualVar pretraining (SimCLR or MoCo)",
                       description="Pretrain from a preset or YAML file, with dotted overrides, e.g. "
                                   "`dualvar pretrain --config demo optim.lr=0.01 data.batch_size=8`.")
    p.add_argument("--config", required=True, help="preset name (engine/configs/NAME.yaml) or a YAML file")
    p.add_argument("--run-dir", help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", help="auto (the newest checkpoint of the run directory that loads), none, or a "
                   "checkpoint path; same as checkpoint.resume=...")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides (values read as YAML)")
    p.set_defaults(func=_run_pretrain)


# ----------------------------------------------------------------------------- export
def _run_export(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError
    from .export import export_backbone
    try:
        meta = export_backbone(args.run_dir, args.out, checkpoint=args.checkpoint)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"dualvar export: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {meta['backbone']} ({meta['method']} {meta['mode']}, step {meta['step']}, "
          f"{meta['frames']} frames at stride {meta['stride']}, {meta['size']} px)")
    return 0


def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a run's pretrained backbone as safetensors (torchvision keys)")
    p.add_argument("run_dir", help="run directory (its newest readable checkpoint is exported)")
    p.add_argument("--out", required=True, help="output file, e.g. model.safetensors")
    p.add_argument("--checkpoint", help="export this checkpoint file instead of the newest")
    p.set_defaults(func=_run_export)


COMMANDS = (add_info, add_data_commands, add_pretrain, add_export, *EVALUATE_COMMANDS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dualvar", description="DualVar self-supervised video pretraining")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def _record(fn):
    # torchrun's failure summary shows an uncaught error of a worker (the rank and its traceback)
    from .distributed import record
    return record(fn)


@_record
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""The `dualvar` command: thin subcommands that parse, build and run."""
from __future__ import annotations

import argparse
import sys


def _info(args: argparse.Namespace) -> int:
    from dualvar.kernels.info import report
    print(report())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dualvar", description="DualVar self-supervised video pretraining")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, device, built and available kernel backends")
    p.set_defaults(func=_info)
    try:
        from dualvar.engine.data.cli import add_data_commands
    except ImportError:
        add_data_commands = None
    if add_data_commands is not None:
        add_data_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

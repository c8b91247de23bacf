"""Command line: ``dinokernels <command>`` or ``python -m dinokernels <command>``."""
import argparse
import json
import sys


def _info(args) -> int:
    from ._build_info import build_info

    info = build_info()
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dinokernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="print build information and whether kernels and the GPU are usable")
    info.add_argument("--json", action="store_true", help="print as JSON")
    info.set_defaults(run=_info)
    from .cli import add_commands

    add_commands(commands)  # pretrain, knn, attention
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

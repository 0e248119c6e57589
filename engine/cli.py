"""`clipforge` command line: one sub-command per module.

Each sub-command lives in its own module, which defines `add_arguments(parser)` and `run(args) -> int`.
The CLI only builds configuration objects from the arguments; the modules do the work, and every
module's `main(argv)` is callable from a test.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS = {
    "make-shards": ("clipforge.shards", "write webdataset shards from a folder or CSV/Parquet of images and captions"),
    "train": ("clipforge.train", "train a CLIP model (DeepSpeed ZeRO, gradient caching)"),
    "embed": ("clipforge.cli_serve", "embed images or texts into a .npy file"),
    "zeroshot": ("clipforge.cli_serve", "zero-shot classify a folder of images"),
    "eval": ("clipforge.cli_serve", "evaluate: zero-shot, retrieval or linear probe"),
    "bench": ("clipforge.bench", "run the benchmarks"),
    "plan": ("clipforge.plan", "plan memory, micro-batch and step time for a cluster"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipforge", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        try:
            mod = importlib.import_module(module)
        except ImportError:
            p.set_defaults(_missing=True)
            continue
        mod.add_arguments(p, name) if _takes_name(mod.add_arguments) else mod.add_arguments(p)
    return parser


def _takes_name(fn) -> bool:
    import inspect

    return len(inspect.signature(fn).parameters) >= 2


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    if getattr(args, "_missing", False):
        print(f"clipforge {args.command}: not available in this build ({args._module} is missing)", file=sys.stderr)
        return 2
    mod = importlib.import_module(args._module)
    return int(mod.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

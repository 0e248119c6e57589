"""`clipforge` command line: one sub-command per module.

Each sub-command lives in its own module, which defines `add_arguments(parser)` and `run(args) -> int`.
The CLI only builds configuration objects from the arguments; the modules do the work, and every
module's `main(argv)` is callable from a test.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> (module, one-line help). A module is imported only when its command runs, so
# `clipforge --help` stays fast and an import error in one module is reported, never hidden.
# Benchmarks are not a sub-command: they live in the repository's benchmarks/ and run under pytest.
COMMANDS = {
    "make-shards": ("clipforge.data.make_shards", "write webdataset shards from a folder or CSV/Parquet of images and captions"),
    "train": ("clipforge.train.run", "train a CLIP model (DeepSpeed ZeRO, gradient caching)"),
    "embed": ("clipforge.serve.cli", "embed images or texts into a .npy file"),
    "zeroshot": ("clipforge.serve.cli", "zero-shot classify a folder of images"),
    "eval": ("clipforge.serve.cli", "evaluate: zero-shot, retrieval or linear probe"),
    "plan": ("clipforge.train.plan", "plan memory, micro-batch and step time for a cluster"),
}


def _chosen(argv) -> str | None:
    for tok in argv:
        if tok in COMMANDS:
            return tok
        if not tok.startswith("-"):
            return None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported and asked for its arguments."""
    parser = argparse.ArgumentParser(prog="clipforge", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        if name == command:
            mod = importlib.import_module(module)
            mod.add_arguments(p, name) if _takes_name(mod.add_arguments) else mod.add_arguments(p)
    return parser


def _takes_name(fn) -> bool:
    import inspect

    return len(inspect.signature(fn).parameters) >= 2


def run_command(name: str, argv=None) -> int:
    """`clipforge NAME ARGV...`: what each sub-command module's own main(argv) runs, so
    `python -m clipforge.train` and `clipforge train` parse and run alike."""
    return main([name, *(sys.argv[1:] if argv is None else argv)])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_chosen(argv))
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    mod = importlib.import_module(args._module)
    return int(mod.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""`llm-local`: one command, several subcommands.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them up. Command modules keep their heavy
imports inside ``run`` so that `llm-local generate` does not pay for torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("llm_local.commands.serve", "serve the model over gRPC and HTTP"),
    "convert": ("llm_local.convert.command", "download and convert the configured model"),
    "generate": ("llm_local.commands.generate", "ask a running server and stream the answer"),
    "settings": ("llm_local.commands.show_settings", "validate and print the effective settings"),
    "doctor": (
        "llm_local.commands.doctor",
        "measure every compute type against the model's numerics reference on this machine",
    ),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `only`, just that subcommand's module is imported (fast start)."""
    parser = argparse.ArgumentParser(
        prog="llm-local", description="On-premise LLM inference service (CTranslate2, gRPC)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or name == only:
            module = importlib.import_module(module_name)
            module.add_arguments(sub_parser)
            sub_parser.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    args = build_parser(only=chosen).parse_args(argv)
    code: int = args._module.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())

"""`llm-local settings`: validate the effective settings and print them, secrets hidden."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--env",
        help="the environment to show (default: $ENV, else development)",
    )
    parser.add_argument(
        "--no-device-check",
        action="store_true",
        help="skip resolving device and compute type against this machine's hardware",
    )


def run(args: argparse.Namespace) -> int:
    from llm_local.settings.device import resolve_compute_type, resolve_device
    from llm_local.settings.errors import SettingsError
    from llm_local.settings.loader import load_settings
    from llm_local.settings.redact import redact

    try:
        settings = load_settings(args.env)
        shown = redact(settings.raw)
        if not args.no_device_check:
            device = resolve_device(settings.runtime)
            compute_type = settings.runtime.compute_type
            shown["resolved"] = {
                "device": device,
                "compute_type": (
                    "auto: the fastest faithful type, measured at load (`llm-local doctor`)"
                    if compute_type == "auto"
                    else resolve_compute_type(settings.runtime, device)
                ),
            }
    except SettingsError as exc:
        print(f"llm-local settings: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(shown, indent=2))
    return 0

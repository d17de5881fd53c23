"""`llm-local serve`: serve the configured model over gRPC and HTTP until stopped.

Exit status: 0 after a graceful stop (SIGTERM/SIGINT), 2 for invalid settings (every
problem is printed), 1 when a listener cannot start (port taken, bad certificate).
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--env",
        help="settings environment (default: $ENV, else development)",
    )


def run(args: argparse.Namespace) -> int:
    import logging

    import trio

    from llm_local.app import StartupError, run_service
    from llm_local.observability.logging import configure_logging
    from llm_local.settings.errors import SettingsError
    from llm_local.settings.loader import load_settings
    from llm_local.transport.tls import TLSConfigError

    try:
        settings = load_settings(args.env)
    except SettingsError as exc:
        print(f"llm-local serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.logging)
    log = logging.getLogger("llm_local.serve")
    log.info(
        "starting llm-local (env %s, backend %s, model %s)",
        settings.env,
        settings.backend,
        settings.model.name,
    )
    try:
        trio.run(run_service, settings)
    except TLSConfigError as exc:
        log.error("cannot serve with TLS: %s", exc)
        return 2
    except BaseExceptionGroup as group:
        startup, _ = group.split(StartupError)
        if startup is None:
            raise
        for problem in _leaves(startup):
            log.error("cannot start: %s", problem)
        return 1
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]

"""The scenarios. Each module's ``run(config, context, collect)`` measures its levels and
hands each finished `LevelRun` to ``collect`` as soon as it has it (so a later failure
keeps what was measured), or raises `ScenarioSkipped` with the reason."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.models import EncodedPrompts
from bench.records import LevelRun, RateRun
from bench.served import Kernels
from bench.studies import Studies

Collect = Callable[[LevelRun], None]


class ScenarioSkipped(Exception):
    """The scenario cannot run here; the message says why and how to enable it."""


@dataclass
class ScenarioContext:
    model_dir: Path  # the converted int8 CTranslate2 model
    gguf_path: Path | None
    prompts: EncodedPrompts
    run_dir: Path  # this run's logs (server output) go here
    # What each scenario learned about its setup (versions, settings): into the report.
    details: dict[str, dict[str, object]] = field(default_factory=dict)
    # The open loop's levels, as each one ends (a later failure keeps them).
    rate_runs: list[RateRun] = field(default_factory=list)
    log: Callable[[str], None] = print
    # What the ct2 server chose on this machine (bench/served.py): the in-process ceiling
    # runs it. None: not known (the in-process scenarios then refuse to run).
    kernels: Kernels | None = None
    # The study scenarios' results (bench/studies.py), as each one ends.
    studies: Studies = field(default_factory=Studies)


def quiet_llama_cpp() -> None:
    """llama.cpp in this process logs every tensor it loads (thousands of lines per load,
    through llama-cpp-python's logger): they would bury the bench's own output. Warnings
    and errors still show."""
    logging.getLogger("llama-cpp-python").setLevel(logging.WARNING)

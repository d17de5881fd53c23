"""Every settings test starts from a clean slate: no settings variables from the shell
running pytest (make test sets ENV=test) and a working directory without settings.toml."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from llm_local.settings.legacy import LEGACY_ENV_VARS

_OUR_VARIABLES = ("ENV", "HF_HUB_OFFLINE", "LLM_LOCAL_SETTINGS_FILES", *LEGACY_ENV_VARS)


@pytest.fixture(autouse=True)
def workdir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    for name in list(os.environ):
        if name.startswith("LLM_LOCAL_SERVICE_") or name in _OUR_VARIABLES:
            monkeypatch.delenv(name)
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    yield workdir

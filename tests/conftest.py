"""Shared fixtures: where the converted SmolLM2 test model lives.

`make test` converts it once (ENV=test) into .cache/models; tests find it through the
same settings the server uses. LLM_LOCAL_TEST_MODEL_DIR overrides the lookup.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def test_model_dir() -> Path:
    override = os.environ.get("LLM_LOCAL_TEST_MODEL_DIR")
    if override:
        return Path(override)
    from llm_local.convert.api import find_converted
    from llm_local.settings.loader import load_settings

    found = find_converted(load_settings(env="test"))
    if found is None:
        pytest.fail(
            "the test model is not converted: run `ENV=test llm-local convert` (make test does)"
        )
    return found

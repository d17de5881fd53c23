"""The benchmark harness is a top-level package beside llm_local, not installed: make the
repository root importable for these tests (import mode is importlib: no implicit path)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parents[2])
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

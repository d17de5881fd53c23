"""bench/scenarios/llama_cpp.py: a peer that crashes at load is started again with the
flags its users would add, and the report says which flags it ran with."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bench.config import BenchConfig
from bench.models import EncodedPrompts
from bench.processes import ServerFailed
from bench.scenarios import ScenarioContext
from bench.scenarios.llama_cpp import serving

# A stand-in for llama-server that crashes at load, as the real one does on the Intel
# AMX machine, unless started with --no-repack; then it answers /health.
FAKE_SERVER = """\
import http.server, sys
argv = sys.argv[1:]
if argv == ["--version"]:
    print("version: 1 (fake)")
    sys.exit(0)
if "--no-repack" not in argv or "{always_crash}" == "yes":
    print("llama threadpool init\\nSegmentation fault", flush=True)
    sys.exit(139)
port = int(argv[argv.index("--port") + 1])

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b'{{"status": "ok"}}')

http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


def fake_binary(tmp_path: Path, *, always_crash: bool) -> Path:
    binary = tmp_path / "llama-server"
    script = FAKE_SERVER.format(always_crash="yes" if always_crash else "no")
    binary.write_text(f"#!{sys.executable}\n{script}")
    binary.chmod(0o755)
    return binary


def context(tmp_path: Path) -> ScenarioContext:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    return ScenarioContext(
        model_dir=tmp_path,
        gguf_path=gguf,
        prompts=EncodedPrompts((), ()),
        run_dir=tmp_path / "run",
        log=lambda line: None,
    )


def test_a_peer_that_crashes_at_load_is_retried_with_no_repack(tmp_path: Path) -> None:
    config = BenchConfig(llama_server=fake_binary(tmp_path, always_crash=False))
    peer = context(tmp_path)
    with serving(config, peer, "llama.cpp", slots=4, context_tokens=2048) as (server, port):
        assert port > 0 and server.pid > 0
    details = peer.details["llama.cpp"]
    assert details["fallback flags"] == "--no-repack"
    assert str(details["failed starts"]).startswith("no extra flags: llama-server exited")
    assert str(details["command"]).endswith("--no-repack")
    assert "<gguf>" in str(details["command"])
    assert details["version"] == "version: 1 (fake)"


def test_a_peer_that_never_starts_fails_with_every_attempt_named(tmp_path: Path) -> None:
    config = BenchConfig(llama_server=fake_binary(tmp_path, always_crash=True))
    with (
        pytest.raises(
            ServerFailed,
            match=r"did not start with any flags: no extra flags: .*; "
            r"--no-repack: llama-server exited",
        ),
        serving(config, context(tmp_path), "llama.cpp", slots=4, context_tokens=2048),
    ):
        pass

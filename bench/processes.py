"""A server under test as a child process: start, watch its resources, stop.

Its output goes to a log file next to the results (read back when it fails to start).
Peak memory is the kernel's high-water mark (VmHWM), so a spike between two samples is
not missed; CPU time is read before and after each level.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import psutil

from bench.records import ProcessUsage

STOP_TIMEOUT_S = 30.0


class ServerFailed(Exception):
    """The server did not start or died; the message quotes the end of its log."""


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (the server binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def peak_rss_bytes(pid: int) -> int | None:
    """The process's resident-set high-water mark (Linux), else its current RSS."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(psutil.Error):
        rss: int = psutil.Process(pid).memory_info().rss
        return rss
    return None


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


class CpuMeter:
    """CPU time and peak memory of one process over a stretch of time."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._before = cpu_seconds(pid)

    def finish(self, *, with_memory: bool = True) -> ProcessUsage:
        spent = cpu_seconds(self._pid) - self._before
        return ProcessUsage(spent, peak_rss_bytes(self._pid) if with_memory else None)


class ServerProcess:
    """`with ServerProcess(argv, env, log_path) as server:` stops it (SIGTERM) on exit."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> None:
        self._argv = list(argv)
        self._env = dict(env)
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                self._argv, env=self._env, stdout=log, stderr=subprocess.STDOUT
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("the server was not started")
        return self._process.pid

    def check_alive(self) -> None:
        """ServerFailed (with the log's tail) when the process has exited."""
        if self._process is not None and self._process.poll() is not None:
            raise ServerFailed(
                f"{Path(self._argv[0]).name} exited with status {self._process.returncode}:\n"
                + self.log_tail()
            )

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return "(no log)"

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; the exit status."""
        process = self._process
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()


def wait_until(
    ready: Callable[[], bool], server: ServerProcess, timeout_s: float, what: str
) -> None:
    """Poll `ready()` until it is true, the server dies, or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        server.check_alive()
        if ready():
            return
        time.sleep(0.25)
    raise ServerFailed(f"{what} not ready after {timeout_s:.0f} s:\n{server.log_tail()}")


def environment_with(overrides: Mapping[str, str]) -> dict[str, str]:
    return {**os.environ, **overrides}

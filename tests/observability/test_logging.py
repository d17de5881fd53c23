"""Structured logging: JSON lines with request fields, readable text with a request tag."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from llm_local.core.types import RequestContext
from llm_local.observability.logging import configure_logging, request_logger
from llm_local.settings.schema import LoggingSettings

CONTEXT = RequestContext(
    request_id="r-1", tenant_id="acme", trace_id="t-9", span_id="s-3", call_id="c-5"
)


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def last_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines, "nothing was logged"
    return lines[-1]


def test_json_lines_carry_the_request_fields_and_extras(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(LoggingSettings(level="INFO", format="json"))
    request_logger(CONTEXT).info(
        "request finished", extra={"status": "OK", "completion_tokens": 7, "ttft_s": 0.05}
    )
    entry = json.loads(last_line(capsys))
    assert entry["message"] == "request finished"
    assert entry["level"] == "INFO"
    assert entry["request_id"] == "r-1"
    assert entry["tenant_id"] == "acme"
    assert entry["trace_id"] == "t-9"
    assert entry["span_id"] == "s-3"
    assert entry["call_id"] == "c-5"
    assert entry["status"] == "OK"
    assert entry["completion_tokens"] == 7
    assert entry["ttft_s"] == 0.05
    assert entry["ts"].endswith("Z")


def test_json_puts_an_exception_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(LoggingSettings(level="INFO", format="json"))
    try:
        raise ValueError("boom")
    except ValueError:
        request_logger(CONTEXT).exception("generation failed")
    entry = json.loads(last_line(capsys))
    assert "ValueError: boom" in entry["exception"]


def test_text_tags_the_line_with_the_request(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(LoggingSettings(level="DEBUG", format="text"))
    request_logger(RequestContext(request_id="r-2", tenant_id="acme", call_id="c-5")).debug(
        "admitted", extra={"queued_s": 0.0}
    )
    line = last_line(capsys)
    assert "[req=r-2 tenant=acme call=c-5]" in line
    assert "admitted" in line
    assert "queued_s=0.0" in line
    assert "trace=" not in line  # absent ids are left out, not printed as None


def test_lines_below_the_level_are_dropped(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(LoggingSettings(level="WARNING", format="text"))
    logging.getLogger("llm_local.test").info("quiet")
    logging.getLogger("llm_local.test").warning("loud")
    err = capsys.readouterr().err
    assert "loud" in err
    assert "quiet" not in err


def test_library_chatter_is_tamed_to_warnings(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(LoggingSettings(level="DEBUG", format="text"))
    logging.getLogger("grpclib.protocol").info("connection made")
    logging.getLogger("hypercorn.error").warning("bind failed")
    err = capsys.readouterr().err
    assert "connection made" not in err
    assert "bind failed" in err


def test_configuring_twice_does_not_duplicate_lines(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(LoggingSettings(level="INFO", format="text"))
    configure_logging(LoggingSettings(level="INFO", format="json"))
    logging.getLogger("llm_local.test").info("once")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["message"] == "once"


def test_an_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="LOUD"):
        configure_logging(LoggingSettings(level="LOUD", format="text"))

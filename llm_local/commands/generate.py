"""`llm-local generate "question"`: ask a running server and stream the answer.

The answer goes to stdout as it arrives; the finish reason, token counts and timings go
to stderr. On a gRPC error the status name and message go to stderr and the exit
status is 1 (2 for bad arguments). A plain asyncio grpclib client: no trio needed here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import ssl

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 16061


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the question (the user prompt)")
    parser.add_argument("--system", default="", help="system prompt")
    parser.add_argument("--max-new-tokens", type=int, help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, help="0 = greedy")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop sequence (repeatable)"
    )
    parser.add_argument("--seed", type=int)
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument(
        "--port", type=int, help=f"gRPC port (default: server.grpc_port, else {DEFAULT_PORT})"
    )
    parser.add_argument("--tls-ca", type=Path, help="CA to verify the server with (enables TLS)")
    parser.add_argument("--tls-cert", type=Path, help="client certificate, for mTLS")
    parser.add_argument("--tls-key", type=Path, help="client key, for mTLS")
    parser.add_argument(
        "--tls-server-name",
        help="name to verify the server certificate against (e.g. sentiric.cloud)",
    )
    parser.add_argument("--timeout", type=float, help="deadline in seconds")
    parser.add_argument("--tenant-id", help="sent as x-tenant-id metadata")
    parser.add_argument("--trace-id", help="sent as x-trace-id metadata")
    parser.add_argument(
        "--call-id", help="sent as x-call-id metadata (the conversation; docs/SCALING.md)"
    )
    parser.add_argument(
        "--service",
        choices=("llama", "local"),
        default="llama",
        help="llama: LlamaService.GenerateStream (default); local: LLMLocalService",
    )


def run(args: argparse.Namespace) -> int:
    import asyncio

    from grpclib.exceptions import GRPCError

    from llm_local.transport.tls import TLSConfigError

    try:
        ssl_context = _ssl_context(args)
    except TLSConfigError as exc:
        print(f"llm-local generate: {exc}", file=sys.stderr)
        return 2
    port = args.port if args.port is not None else _configured_port()
    try:
        return asyncio.run(_generate(args, port, ssl_context))
    except GRPCError as exc:
        print(f"llm-local generate: {exc.status.name}: {exc.message}", file=sys.stderr)
        return 1
    except (TimeoutError, OSError) as exc:
        print(
            f"llm-local generate: cannot reach {args.host}:{port}: {exc} "
            "(is `llm-local serve` or `make run` running, on that address and port?)",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("\nllm-local generate: interrupted", file=sys.stderr)
        return 130


def _configured_port() -> int:
    """server.grpc_port of the effective settings, so `make run` + `generate` just work."""
    try:
        from llm_local.settings.loader import load_settings

        return load_settings().server.grpc_port or DEFAULT_PORT
    except Exception:  # any settings problem: the client still works with the default
        return DEFAULT_PORT


def _ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    from llm_local.transport.tls import client_ssl_context

    if args.tls_ca is None and args.tls_cert is None and args.tls_key is None:
        return None
    return client_ssl_context(args.tls_ca, args.tls_cert, args.tls_key)


def _metadata(args: argparse.Namespace) -> dict[str, str]:
    metadata = {}
    if args.tenant_id:
        metadata["x-tenant-id"] = args.tenant_id
    if args.trace_id:
        metadata["x-trace-id"] = args.trace_id
    if args.call_id:
        metadata["x-call-id"] = args.call_id
    return metadata


def llama_request(args: argparse.Namespace) -> Any:
    from llm_local.proto.sentiric.llm.v1 import llama_pb2

    params = llama_pb2.GenerationParams(stop_sequences=args.stop)
    for name in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed"):
        value = getattr(args, name)
        if value is not None:
            setattr(params, name, value)
    return llama_pb2.GenerateStreamRequest(
        system_prompt=args.system, user_prompt=args.prompt, params=params
    )


async def _generate(args: argparse.Namespace, port: int, ssl_context: ssl.SSLContext | None) -> int:
    import time

    from grpclib.client import Channel
    from grpclib.config import Configuration

    config = Configuration(ssl_target_name_override=args.tls_server_name)
    channel = Channel(args.host, port, ssl=ssl_context, config=config)
    started = time.perf_counter()
    try:
        if args.service == "local":
            first, finish = await _stream_local(channel, args)
        else:
            first, finish = await _stream_llama(channel, args)
    finally:
        channel.close()
    elapsed = time.perf_counter() - started
    sys.stdout.write("\n")
    sys.stdout.flush()
    timing = f"first text after {first * 1000:.0f} ms, " if first is not None else ""
    print(f"[{finish}; {timing}total {elapsed:.2f} s]", file=sys.stderr)
    return 0


async def _stream_llama(channel: Any, args: argparse.Namespace) -> tuple[float | None, str]:
    import codecs
    import time

    from llm_local.proto.sentiric.llm.v1.llama_grpc import LlamaServiceStub

    started = time.perf_counter()
    first: float | None = None
    # Chunks carry whole characters, but the contract allows a split one: decode safely.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    finish = "no finish_details received"
    stub = LlamaServiceStub(channel)
    async with stub.GenerateStream.open(timeout=args.timeout, metadata=_metadata(args)) as stream:
        await stream.send_message(llama_request(args), end=True)
        async for response in stream:
            if response.HasField("finish_details"):
                details = response.finish_details
                finish = (
                    f"finish_reason={details.finish_reason} "
                    f"prompt_tokens={details.prompt_tokens} "
                    f"completion_tokens={details.completion_tokens}"
                )
                continue
            if first is None:
                first = time.perf_counter() - started
            sys.stdout.write(decoder.decode(response.token))
            sys.stdout.flush()
    sys.stdout.write(decoder.decode(b"", final=True))
    return first, finish


async def _stream_local(channel: Any, args: argparse.Namespace) -> tuple[float | None, str]:
    import time

    from llm_local.proto.sentiric.llm.v1 import local_pb2
    from llm_local.proto.sentiric.llm.v1.local_grpc import LLMLocalServiceStub

    ignored = [
        name
        for name in ("max_new_tokens", "temperature", "top_p", "top_k", "seed")
        if getattr(args, name) is not None
    ]
    if ignored or args.system or args.stop:
        print(
            "llm-local generate: LLMLocalService takes only the prompt; other options are ignored",
            file=sys.stderr,
        )
    started = time.perf_counter()
    first: float | None = None
    chunks = 0
    stub = LLMLocalServiceStub(channel)
    async with stub.LocalGenerateStream.open(
        timeout=args.timeout, metadata=_metadata(args)
    ) as stream:
        await stream.send_message(
            local_pb2.LocalGenerateStreamRequest(prompt=args.prompt), end=True
        )
        async for response in stream:
            if first is None:
                first = time.perf_counter() - started
            chunks += 1
            sys.stdout.write(response.token)
            sys.stdout.flush()
    return first, f"stream ended OK after {chunks} chunks"

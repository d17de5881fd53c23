"""The gRPC calls `make image-check` makes through the compose stack's published port.

Run with the project's virtualenv (it has grpcio and the generated messages):

    python docker/image_check_client.py ask --port 16061
        greedy "What is the capital of France? ..." -> prints the answer; exit 0 when
        it names Paris and the stream ends with its finish details.
    python docker/image_check_client.py drain --port 16061 --started FILE
        a long greedy generation; FILE is created at the first token (the caller then
        stops the container) and FILE.last gets the time of the last token (epoch
        seconds); exit 0 when the stream still ends with its finish details,
        i.e. the service let it finish instead of cutting it.

ENV=production requires the x-tenant-id header on every call, as the gateway sends it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import grpc

from llm_local.proto.sentiric.llm.v1 import llama_pb2

GENERATE_PATH = "/sentiric.llm.v1.LlamaService/GenerateStream"
QUESTION = "What is the capital of France? Answer in one sentence."
LONG_PROMPT = "Write a long story about a dragon who learns to cook. Use many details."
METADATA = (("x-tenant-id", "image-check"),)


def _stream(
    port: int, prompt: str, max_new_tokens: int, timeout_s: float, started: Path | None
) -> tuple[str, bool]:
    """The text generated and whether the stream ended with its finish details."""
    request = llama_pb2.GenerateStreamRequest(
        user_prompt=prompt,
        params=llama_pb2.GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0),
    )
    pieces: list[bytes] = []
    finished = False
    last_token_at = 0.0
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        generate = channel.unary_stream(
            GENERATE_PATH,
            request_serializer=llama_pb2.GenerateStreamRequest.SerializeToString,
            response_deserializer=llama_pb2.GenerateStreamResponse.FromString,
        )
        for response in generate(request, metadata=METADATA, timeout=timeout_s):
            kind = response.WhichOneof("type")
            if kind == "token":
                pieces.append(response.token)
                if started is not None:
                    if len(pieces) == 1:
                        started.touch()
                    last_token_at = time.time()
            elif kind == "finish_details":
                finished = True
    if started is not None:
        started.with_name(started.name + ".last").write_text(f"{last_token_at:.3f}\n")
    return b"".join(pieces).decode("utf-8", errors="replace"), finished


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("ask", "drain"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--started", type=Path, help="drain: created at the first token")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds for the call")
    args = parser.parse_args(argv)
    try:
        if args.command == "ask":
            text, finished = _stream(args.port, QUESTION, 32, args.timeout, None)
            print(f"answer: {text.strip()!r}")
            return 0 if finished and "Paris" in text else 1
        text, finished = _stream(args.port, LONG_PROMPT, 300, args.timeout, args.started)
        print(f"drain: {len(text)} characters streamed, finish details: {finished}")
        return 0 if finished else 1
    except grpc.RpcError as error:
        print(f"{args.command}: gRPC error {error.code()}: {error.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""Regenerate the protobuf and grpclib modules from the .proto files (`make proto`).

The generated modules are checked in so that a fresh clone works without protoc;
``python -m llm_local.proto.build --check`` fails when they differ from a fresh run.

protoc names imports after the proto include path (``sentiric.llm.v1.llama_pb2``);
the modules live inside this package, so those imports are rewritten to
``llm_local.proto.sentiric.llm.v1.llama_pb2`` while the proto file names (what
reflection and grpcurl show) stay the canonical ``sentiric/llm/v1/*.proto``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from google.protobuf.descriptor_pb2 import DescriptorProto

PROTO_ROOT = Path(__file__).resolve().parent
PACKAGE = "llm_local.proto"
PROTO_PACKAGES = ("sentiric",)
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_grpc.py")
STUB_HEADER = "# mypy: ignore-errors\n"

# A reference to a generated module, not the gRPC method paths ('/sentiric.llm.v1.X/Y')
# that the grpclib stubs also contain.
_MODULE_REFERENCE = re.compile(
    r"(?<![\w./'\"])(" + "|".join(PROTO_PACKAGES) + r")((?:\.\w+)*\.\w+_pb2)\b"
)


def proto_files() -> list[Path]:
    return sorted(
        path for package in PROTO_PACKAGES for path in (PROTO_ROOT / package).rglob("*.proto")
    )


def _qualify_imports(source: str) -> str:
    return _MODULE_REFERENCE.sub(rf"{PACKAGE}.\1\2", source)


def _run_protoc(*outputs: str) -> None:
    # grpcio-tools is a development dependency: only `make proto` and the tests need it.
    import grpc_tools  # type: ignore[import-untyped]
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    # The plugin is a console script of grpclib, beside this interpreter in a venv that
    # may not be on PATH.
    plugin = shutil.which("protoc-gen-grpclib_python") or str(
        Path(sys.executable).parent / "protoc-gen-grpclib_python"
    )
    relative = [str(path.relative_to(PROTO_ROOT)) for path in proto_files()]
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--plugin=protoc-gen-grpclib_python={plugin}",
            *outputs,
            *relative,
        ]
    )
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")


def fresh_descriptors() -> dict[str, bytes]:
    """Serialized FileDescriptorProto of each .proto file, straight from protoc.

    Comparing these with the DESCRIPTOR of the checked-in modules tells whether those
    modules still describe the .proto files, whatever protoc version wrote them.
    """
    from google.protobuf.descriptor_pb2 import FileDescriptorSet

    with tempfile.TemporaryDirectory() as tmp:
        descriptor_set = Path(tmp) / "set.pb"
        _run_protoc(f"--descriptor_set_out={descriptor_set}")
        parsed = FileDescriptorSet.FromString(descriptor_set.read_bytes())
    for file in parsed.file:
        _drop_json_names(file.message_type)
    return {file.name: file.SerializeToString() for file in parsed.file}


def _drop_json_names(messages: Iterable[DescriptorProto]) -> None:
    # protoc fills json_name in descriptor sets; the Python generator leaves it out.
    for message in messages:
        for message_field in message.field:
            message_field.ClearField("json_name")
        _drop_json_names(message.nested_type)


def generate(output_dir: Path) -> list[Path]:
    """Run protoc on every .proto file, writing modules under `output_dir`."""
    _run_protoc(
        f"--python_out={output_dir}",
        f"--pyi_out={output_dir}",
        f"--grpclib_python_out={output_dir}",
    )
    generated = sorted(
        path
        for path in output_dir.rglob("*")
        if path.is_file() and path.name.endswith(GENERATED_SUFFIXES)
    )
    for path in generated:
        source = _qualify_imports(path.read_text())
        if path.suffix == ".pyi":
            # mypy reads stubs even where follow_imports=skip, and protoc's stubs are not
            # --strict clean (bare Mapping); they are generated, not ours to fix.
            source = STUB_HEADER + source
        path.write_text(source)
    return generated


def _differences(fresh_dir: Path) -> list[str]:
    problems = []
    fresh = {path.relative_to(fresh_dir) for path in generate(fresh_dir)}
    checked_in = {
        path.relative_to(PROTO_ROOT)
        for package in PROTO_PACKAGES
        for path in (PROTO_ROOT / package).rglob("*")
        if path.is_file() and path.name.endswith(GENERATED_SUFFIXES)
    }
    for relative in sorted(fresh | checked_in):
        if relative not in checked_in:
            problems.append(f"missing: {relative}")
        elif relative not in fresh:
            problems.append(f"stale (no .proto generates it): {relative}")
        elif (fresh_dir / relative).read_text() != (PROTO_ROOT / relative).read_text():
            problems.append(f"out of date: {relative}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_local.proto.build", description=__doc__)
    parser.add_argument(
        "--check",
        action="store_true",
        help="compare the checked-in modules with a fresh generation; change nothing",
    )
    args = parser.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            problems = _differences(Path(tmp))
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("run `make proto` to regenerate", file=sys.stderr)
        return 1 if problems else 0
    for path in generate(PROTO_ROOT):
        print(f"wrote {path.relative_to(PROTO_ROOT.parent.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The wire contract: .proto files under sentiric/ and their generated modules.

Regenerate with `make proto` (``python -m llm_local.proto.build``); the generated
modules are checked in so that a fresh clone needs no protoc.
"""

"""Structured output, engine-neutral: what a request asks the answer to be (a JSON schema, a
tool call), the limits and rules it is checked against, and the tool-call text format.

Compiling a constraint to a grammar and masking each step belong to the backends whose
engine exposes the step (backends/shared/grammar.py, backends/llama_cpp)."""

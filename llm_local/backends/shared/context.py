"""Where model configs state their context length, for backends that read a config.json."""

from __future__ import annotations

DEFAULT_CONTEXT_LIMIT = 2048
# Where model configs state their context length, in order of preference.
CONTEXT_LIMIT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_sequence_length",
    "max_seq_len",
    "seq_length",
)

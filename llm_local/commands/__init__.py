"""Subcommands of `llm-local` (see cli.py)."""

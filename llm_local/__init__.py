"""llm-local: an on-premise LLM inference service streaming tokens over gRPC."""

__version__ = "0.1.0"

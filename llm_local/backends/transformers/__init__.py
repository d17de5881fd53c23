"""The transformers backend (entry point ``transformers``): the model unconverted, in PyTorch.

For models CTranslate2 cannot convert, and as the exact, unquantized implementation.
Modules: ``backend`` (the Backend over transformers' continuous batching manager),
``loader`` (settings to a loaded model), ``relay`` (tokens from the generation thread to
each request's consumer).
"""

from llm_local.backends.base import BackendFactory
from llm_local.backends.transformers.backend import TransformersBackend
from llm_local.backends.transformers.backend import create_backend as _create_backend

# Typed as the registry's factory: mypy then checks TransformersBackend against the protocol.
create_backend: BackendFactory = _create_backend

__all__ = ["TransformersBackend", "create_backend"]

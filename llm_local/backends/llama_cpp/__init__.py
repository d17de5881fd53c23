"""The llama.cpp backend (entry point ``llama_cpp``): a GGUF served as is.

Needs the optional extra: ``pip install 'llm-local[llama-cpp]'`` (llama-cpp-python, which
builds llama.cpp at install). Modules: ``backend`` (the Backend), ``loader`` (settings to
a loaded GGUF), ``library`` (the library's parameters; the only place that loads and
frees), ``tokenizer`` (the GGUF's vocabulary and chat template), ``scheduler`` (the
continuous-batching worker), ``policy`` (its pure rule: who gets what at each step),
``sampling`` (one sampler chain per request).
"""

from llm_local.backends.base import BackendFactory
from llm_local.backends.llama_cpp.backend import LlamaCppBackend
from llm_local.backends.llama_cpp.backend import create_backend as _create_backend

# Typed as the registry's factory: mypy then checks LlamaCppBackend against the protocol.
create_backend: BackendFactory = _create_backend

__all__ = ["LlamaCppBackend", "create_backend"]

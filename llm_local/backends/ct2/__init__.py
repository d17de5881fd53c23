"""The CTranslate2 backend (entry point ``ct2``): the product's inference engine.

Modules: ``backend`` (the Backend), ``loader`` (settings to a loaded model),
``scheduler`` (queue, batch forming, worker threads), ``grouping`` (the pure batching
policy), ``decode`` (one batch through ``generate_batch``; sampling options and seeds).
The token bridge, the cost model and the thread count live in ``backends.shared``.
"""

from llm_local.backends.base import BackendFactory
from llm_local.backends.ct2.backend import BatchingOptions, CT2Backend
from llm_local.backends.ct2.backend import create_backend as _create_backend
from llm_local.backends.ct2.scheduler import BatchStarted

# Typed as the registry's factory: mypy then checks CT2Backend against the protocol.
create_backend: BackendFactory = _create_backend

__all__ = ["BatchStarted", "BatchingOptions", "CT2Backend", "create_backend"]

"""An OpenAI-compatible server over a bundle, in three layers:

- :mod:`.protocol` — request models, response / chunk / error builders (pure);
- :mod:`.engine` — batching, fairness between requests, per-batch limits, cancellation;
- :mod:`.api` — the API surface (:class:`~.api.OpenAIService`), no HTTP;
- :mod:`.app` — thin FastAPI routes, authentication and body limits; :func:`serve`.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``.
The model name is a branch, a pipeline, or ``auto`` (the router). The answering branch is returned in
each response (``branch`` field and ``X-Branchmerge-Branch`` header).
"""

from branchmerge.server.api import OpenAIService, ServerLimits
from branchmerge.server.app import create_app, serve

__all__ = ["OpenAIService", "ServerLimits", "create_app", "serve"]

"""OpenAI-compatible HTTP server on the engine: ``build_app`` (FastAPI) and ``serve`` (uvicorn, graceful shutdown).

Modules: ``protocol`` (OpenAI request/response shapes), ``errors`` (OpenAI error
bodies), ``completions`` (engine outputs -> responses / SSE), ``metrics``
(Prometheus), ``app`` (routes), ``server`` (uvicorn runner), ``demo_stage``.
"""

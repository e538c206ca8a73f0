"""OpenAI-compatible HTTP server with endless, persistent sessions (`sinkstream serve`).

Needs the ``server`` extra (fastapi, uvicorn); the core never imports this package, and only ``app``,
``schemas`` and ``responses`` import fastapi/pydantic. Layout: ``cli`` (flags, socket, uvicorn), ``app``
(routes and middleware), ``schemas`` (request bodies), ``responses`` (answer, chunk and error shapes),
``engine`` (what a request does on the worker), ``worker`` (one generation thread and its bounded queue),
``sessions`` (LRU in memory, files on disk), ``metrics`` (Prometheus text), ``errors`` (OpenAI-shaped errors).
"""

"""OpenAI-compatible HTTP server with endless, persistent sessions (`sinkstream serve`).

Needs the ``server`` extra (fastapi, uvicorn). Nothing here is imported by the core; ``app`` is the only
module that imports fastapi. Layout: ``cli`` (flags, socket, uvicorn), ``app`` (HTTP routes), ``schemas``
(request bodies), ``engine`` (what a request does on the worker), ``worker`` (one generation thread and its
bounded queue), ``sessions`` (LRU in memory, files on disk), ``metrics`` (Prometheus text).
"""

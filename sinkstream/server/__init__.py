"""OpenAI-compatible HTTP server with endless, persistent sessions (`sinkstream serve`).

Needs the ``server`` extra (fastapi, uvicorn); the core never imports this package, and only ``app``,
``schemas`` and ``responses`` import fastapi/pydantic. Layout: ``cli`` (flags, socket, uvicorn), ``app``
(routes and middleware), ``schemas`` (request bodies), ``responses`` (answer, chunk and error shapes),
``engine`` (what a request does on the worker), ``worker`` (one generation thread and its bounded queue),
``sessions`` (LRU in memory, files on disk), ``lease`` (epochs and locks when replicas share the
folder), ``metrics`` (Prometheus text), ``errors`` (OpenAI-shaped errors), ``page``/``layout`` (the web page
and its cache view), ``ray_route`` (which session a request names, and running the app on a forwarded
request) and ``ray_cli`` (``serve --ray``; the only module here besides `sinkstream.deploy` that imports ray).
"""

"""`sinkstream serve`: flags, socket, uvicorn. Imports fastapi/uvicorn only when the command runs."""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from .. import cli_args as A
from ..errors import SinkstreamError


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with endless, persistent sessions",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback only by default)")
    p.add_argument("--port", type=A.port, default=8080, help="TCP port; 0 picks a free one (printed on start)")
    p.add_argument("--state-dir", default=None,
                   help="folder for session files; sessions survive restarts (default: a temporary folder)")
    p.add_argument("--api-key", default=os.environ.get("SINKSTREAM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $SINKSTREAM_API_KEY)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: from --model)")
    p.add_argument("--max-tokens", type=int, default=4096, help="largest max_tokens one request may ask for")
    p.add_argument("--max-prompt-tokens", type=int, default=32768, help="new prompt tokens per request")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20, help="larger request bodies get 413")
    p.add_argument("--max-batch", type=int, default=8,
                   help="requests answered at once, their forward passes batched (1: one at a time)")
    p.add_argument("--prefill-budget", type=int, default=256,
                   help="prompt tokens per batched step that short prompts may take whole beside decoding requests; "
                        "longer prompts go in chunks that cost about one decode step (timed as the server runs)")
    p.add_argument("--max-queue", type=int, default=8, help="requests waiting beyond --max-batch; more get 503")
    p.add_argument("--max-live-sessions", type=int, default=8, help="sessions kept in memory (LRU)")
    p.add_argument("--max-sessions", type=int, default=1000, help="sessions kept in all (memory + disk)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    A.add_model_args(p)
    A.add_cache_args(p)
    A.add_sampling_args(p)
    p.set_defaults(func=serve)


def _check_state_dir(folder: Path) -> None:
    """Make --state-dir now, so a file in the way or a read-only place is a one-line error at start."""
    if folder.exists() and not folder.is_dir():
        raise SinkstreamError(f"--state-dir {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SinkstreamError(f"--state-dir {folder}: cannot make it: {e.strerror or e}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SinkstreamError(f"--state-dir {folder} is not writable")


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        raise SinkstreamError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(args) -> int:
    try:
        import uvicorn

        from .app import Settings, create_app, settings_id
        from .schemas import Limits
    except ModuleNotFoundError as e:
        raise SinkstreamError(f"the server needs {e.name}: pip install 'sinkstream[server]'") from None
    from ..loading import resolve
    resolve(args.model)  # a missing model is a one-line error now, not a failed background load
    A.check_device(args.device)
    if args.state_dir is not None:
        _check_state_dir(Path(args.state_dir))
    for flag in ("max_tokens", "max_prompt_tokens", "max_body_bytes", "max_queue", "max_batch", "prefill_budget",
                 "max_live_sessions", "max_sessions"):
        if getattr(args, flag) < 1:
            raise SinkstreamError(f"--{flag.replace('_', '-')} must be at least 1")
    limits = Limits(max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
                    max_body_bytes=args.max_body_bytes, max_queue=args.max_queue, max_batch=args.max_batch,
                    prefill_budget=args.prefill_budget, max_live=args.max_live_sessions, max_sessions=args.max_sessions)
    settings = Settings(model=args.model, model_id=args.model_name or settings_id(args.model), device=args.device,
                        dtype=args.dtype, quant=args.quant, cache=A.cache_config(args),
                        sampling=A.sampling_config(args), state_dir=args.state_dir, api_key=args.api_key or None,
                        limits=limits)
    failed = []

    def on_load_error(message: str) -> None:
        print(f"sinkstream: error: {message}", file=sys.stderr, flush=True)
        failed.append(message)
        server.should_exit = True

    app = create_app(settings, on_load_error=on_load_error)
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=3))
    if not settings.api_key and host not in ("127.0.0.1", "::1", "localhost"):
        print("sinkstream: warning: listening beyond loopback without --api-key", file=sys.stderr)
    url_host = f"[{host}]" if ":" in host else host
    print(f"sinkstream: serving {settings.model_id} on http://{url_host}:{port} "
          f"(cache {settings.cache.describe()}, sessions in {args.state_dir or 'a temporary folder'})",
          file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    return 2 if failed else 0

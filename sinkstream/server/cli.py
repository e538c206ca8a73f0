"""`sinkstream serve`: flags, socket, uvicorn. Imports fastapi/uvicorn only when the command runs, and ray only
with --ray (then `ray_cli` runs the same settings as Ray Serve replicas, see sinkstream.deploy)."""
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
    p.add_argument("--pin-system", action="store_true",
                   help="sessions keep their system prompt for ever (its tokens become the cache's sinks) unless a "
                        "request says \"pin_system\": false")
    p.add_argument("--prefix-cache", type=A.parse_size, default=256 << 20, metavar="BYTES",
                   help="memory for the KV of system prompts shared by sessions, computed once (e.g. 256M; 0: off)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    add_ray_args(p)
    A.add_model_args(p)
    A.add_cache_args(p)
    A.add_sampling_args(p)
    p.set_defaults(func=serve)


def add_ray_args(p: argparse.ArgumentParser) -> None:
    """`--ray` and its options (the flags only: ray is imported when --ray runs; see sinkstream.deploy)."""
    g = p.add_argument_group("Ray Serve (--ray; pip install 'sinkstream[ray]')")
    g.add_argument("--ray", action="store_true",
                   help="run --replicas engine replicas on Ray Serve behind Ray's HTTP proxy; each session stays on "
                        "one replica and is saved in --state-dir, which every replica must reach")
    g.add_argument("--replicas", type=A.positive_int, default=2, help="engine replicas (--ray)")
    g.add_argument("--cpus-per-replica", type=A.positive_int, default=1,
                   help="Ray CPUs each replica reserves, and its torch threads (--ray)")
    g.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (e.g. 'auto' on a node of it) instead of starting one on this machine")
    g.add_argument("--affinity", default="hash", choices=["hash", "multiplex"],
                   help="how a session's requests find its replica: consistent hashing on the session id, or Ray's "
                        "model multiplexing with the session id as the model id (see sinkstream.deploy)")


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

        from .app import create_app
    except ModuleNotFoundError as e:
        raise SinkstreamError(f"the server needs {e.name}: pip install 'sinkstream[server]'") from None
    settings = settings_from(args)
    if args.ray:
        from .ray_cli import serve_ray  # imports ray
        return serve_ray(args, settings)
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


def settings_from(args):
    """The server's `Settings` from `sinkstream serve`'s flags, checked (a bad one is a one-line error now)."""
    try:
        from .app import Settings, settings_id
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
    return Settings(model=args.model, model_id=args.model_name or settings_id(args.model), device=args.device,
                    dtype=args.dtype, quant=args.quant, cache=A.cache_config(args),
                    sampling=A.sampling_config(args), state_dir=args.state_dir, api_key=args.api_key or None,
                    limits=limits, pin_system=args.pin_system, prefix_bytes=args.prefix_cache)

"""sinkstream on Ray Serve: engine replicas behind Ray's HTTP proxy, each session kept on one replica and
saved in a folder that every replica mounts. Needs ``pip install 'sinkstream[ray]'``; nothing else in
sinkstream imports this module or ray.

Start it with ``sinkstream serve --ray --replicas N --state-dir DIR ...`` (sinkstream.server.ray_cli), with
``serve run sinkstream.deploy:build model=... state_dir=DIR replicas=N`` (the same flags as keys), or with
``SINKSTREAM_SERVE_ARGS="--state-dir DIR --replicas N ..." serve run sinkstream.deploy:app``.

One Ray Serve application, two deployments:

* `Gateway`, the HTTP ingress (no model, no CPU reserved): finds each request's session id
  (`sinkstream.server.ray_route.session_of`: the ``X-Session-Id`` header, a completion's ``"session"``, the
  id in ``/v1/sessions/{id}``; a ``POST /v1/sessions`` without an id gets one here) and hands the request to
  the `Replica` deployment through a handle whose routing key is that id. The answer streams back chunk by
  chunk. Ray's failures become the server's errors: a full queue (``max_queued_requests``, Ray's
  `BackPressureError`) is 503 ``queue_full`` with Retry-After; a replica that dies before answering is 503
  ``replica_died``; one that dies while streaming ends the stream with that error as its last event.
* `Replica`, the engine: the single-machine server's app (`sinkstream.server.app.create_app`, the batched
  engine, its limits and errors) run in-process on the forwarded requests (`ray_route.call_app`). Its
  `SessionStore` shares the state folder under the replica's name, so sessions are leased (a save is a
  compare-and-swap on the session's epoch, see sinkstream.server.sessions). Every answer carries
  ``X-Sinkstream-Replica`` (the Ray replica id), ``X-Sinkstream-Pid`` and ``X-Sinkstream-Node``.

Affinity (``affinity="hash"``, the default): `SessionRouter`, Ray's consistent-hash request router keyed on the
session id, with no fallback replica: a session's requests go to one replica, and wait in Ray's queue while
it is full rather than go to another. When a replica dies, only its sessions move (to the next replica on
the ring), and they move again only if a replica joins in front of them; the replica that gets a session
loads its file, the last completed turn. `SessionRouter` drops a dead replica from the ring as soon as a
request finds it dead, instead of waiting for the controller to notice. ``affinity="multiplex"`` uses Ray's
model multiplexing with the session id as the model id instead (kept to compare, benchmarks/ray_scale.py):
requests go to a replica that reported holding the id, but to any other one when it is busy for a second or
before its report reached the router, so a session can be answered by two replicas in turn (correct, the
lease sees to that, but each move reloads the session from disk).

Back-pressure: each replica takes ``max_ongoing_requests = max_batch + max_queue`` requests (its request
threads and its own queue, so it never refuses for a full queue itself) and each gateway holds at most
``max_queued_requests = max_queue x replicas`` more, beyond which Ray raises `BackPressureError`: 503. (The
replica's own queue holds max_batch more than Ray sends it: Ray frees a request's slot when its stream closes,
a moment before the engine has cancelled the job, and a request let in meanwhile waits.) A second
request for a session that is answering one is 429 ``session_busy`` from its replica, as on one machine.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shlex
from dataclasses import dataclass

import ray
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter

from .errors import SinkstreamError
from .server.errors import ApiError
from .server.ray_route import call_app, error_messages, read_body, session_of
from .server.responses import sse

log = logging.getLogger("sinkstream.server")

APP_NAME = "sinkstream"
AFFINITIES = ("hash", "multiplex")


@dataclass
class RayOptions:
    replicas: int = 2
    cpus_per_replica: int = 1          # Ray CPUs a replica reserves; also its torch threads
    affinity: str = "hash"             # see the module docstring
    gateways: int = 1                  # Gateway replicas (cheap: one per node that takes traffic)
    health_check_period_s: float = 2.0
    health_check_timeout_s: float = 10.0
    virtual_nodes: int = 100           # per replica on the hash ring


class SessionRouter(ConsistentHashRouter):
    """Ray's consistent-hash router, its ring rebuilt as soon as a request finds a replica dead (Ray's waits
    for the controller's next replica list, a health-check period or more, while the dead replica's sessions
    have nowhere to go)."""

    def on_replica_actor_died(self, replica_id):
        super().on_replica_actor_died(replica_id)
        self._rebuild_ring(frozenset(self._replica_id_set))


# --- the engine ---------------------------------------------------------------------------------------------
class Replica:
    """One engine: the server's app with its model, answering the requests the gateway forwards."""

    def __init__(self, settings, options: RayOptions):
        import torch

        from .loading import load
        from .server.app import create_app
        torch.set_num_threads(max(1, int(options.cpus_per_replica)))
        self.name = serve.get_replica_context().replica_id.unique_id
        # Ray counts a request done when its stream closes, while the engine may still be cancelling its job:
        # the app's own queue has room for max_batch more, so such an overlap waits instead of getting 503
        limits = dataclasses.replace(settings.limits, max_queue=settings.limits.max_queue + settings.limits.max_batch)
        self.app = create_app(dataclasses.replace(settings, replica=self.name, limits=limits))
        self.state = self.app.state.sinkstream
        errors: list[str] = []
        self.state.load(load, errors.append)  # here, not in a thread: Ray routes nothing here before it ends
        if errors:
            raise SinkstreamError(f"replica {self.name}: {errors[0]}")
        self.headers = [(b"x-sinkstream-replica", self.name.encode()), (b"x-sinkstream-pid", str(os.getpid()).encode()),
                        (b"x-sinkstream-node", ray.util.get_node_ip_address().encode())]
        self.hold = None
        if options.affinity == "multiplex":
            async def hold(sid: str) -> str:  # nothing to load: Ray only learns that this replica holds `sid`
                return sid
            self.hold = serve.multiplexed(max_num_models_per_replica=settings.limits.max_live)(hold)

    async def forward(self, request: dict):
        """Answer one forwarded HTTP request: ``{"status", "headers"}``, then the body's chunks."""
        if self.hold is not None:
            sid = serve.get_multiplexed_model_id()
            if sid:
                await self.hold(sid)
        async for item in call_app(self.app, request, extra_headers=self.headers):
            yield item

    def check_health(self) -> None:
        """Ray's periodic health check: the engine must be up."""
        if self.state.engine is None:
            raise RuntimeError(f"replica {self.name} has no engine: {self.state.error}")

    def __del__(self):
        state = getattr(self, "state", None)
        if state is not None:
            state.close()


# --- the ingress ----------------------------------------------------------------------------------------------
class Gateway:
    """Ray's HTTP proxy hands every request here; it goes on to the replica its session routes to."""

    def __init__(self, replicas, options: RayOptions, max_body_bytes: int):
        self.replicas = replicas.options(stream=True)
        self.affinity, self.max_body = options.affinity, max_body_bytes

    def __serve_build_asgi_app__(self):
        async def app(scope, receive, send):  # a plain coroutine function: uvicorn takes it for ASGI 3
            await self.asgi(scope, receive, send)
        return app

    def _handle(self, sid: str | None):
        if sid is None:
            return self.replicas
        if self.affinity == "multiplex":
            return self.replicas.options(multiplexed_model_id=sid)
        return self.replicas.options(session_id=sid)

    async def asgi(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        try:
            body = await read_body(receive, self.max_body)
        except ApiError as e:
            return await _send_all(send, error_messages(e))
        if body is None:
            return
        headers = [(bytes(k), bytes(v)) for k, v in scope["headers"]]
        sid, body = session_of(scope["method"], scope["path"], headers, body)
        request = {"method": scope["method"], "path": scope["path"], "query": scope.get("query_string", b""),
                   "headers": headers, "body": body, "client": scope.get("client")}
        stream = self._handle(sid).forward.remote(request)
        finished = False
        try:
            try:
                start = await stream.__anext__()
            except StopAsyncIteration:
                start = None
            except Exception as e:  # noqa: BLE001 - Ray's failures, translated below
                finished = True
                return await _send_all(send, error_messages(*ray_error(e, sid)))
            if start is None:
                finished = True
                return await _send_all(send, error_messages(ApiError(503, "the replica sent no answer; retry",
                                                                     code="replica_died")))
            await send({"type": "http.response.start", "status": start["status"], "headers": start["headers"]})
            events = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                         for k, v in start["headers"])
            try:
                async for chunk in stream:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except Exception as e:  # noqa: BLE001 - the replica died mid-answer
                if not isinstance(e, OSError):
                    error, _ = ray_error(e, sid)
                    log.warning("stream cut: %s", error.message)
                    if events:  # the stream's last event says why, as the server's own in-stream errors do
                        tail = sse(error.body()) + "data: [DONE]\n\n"
                        await send({"type": "http.response.body", "body": tail.encode(), "more_body": True})
            finished = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if not finished:  # the client left or Ray cancelled us: stop the replica's work too
                stream.cancel()


async def _send_all(send, messages) -> None:
    for m in messages:
        await send(m)


def ray_error(e: Exception, sid: str | None) -> tuple[ApiError, list[tuple[bytes, bytes]]]:
    """The server's error (and extra headers) for what a handle call to a replica raised."""
    if isinstance(e, RayTaskError) and isinstance(getattr(e, "cause", None), Exception):
        e = e.cause
    which = f"session {sid!r}" if sid else "this request"
    if isinstance(e, BackPressureError):
        return ApiError(503, f"the replicas are busy ({e.message}); retry shortly", code="queue_full"), \
            [(b"retry-after", b"1")]
    if isinstance(e, (RayActorError, ActorUnavailableError, ReplicaUnavailableError)):
        keep = "; the session keeps every completed turn: send this turn again" if sid else "; retry"
        return ApiError(503, f"the replica answering {which} stopped ({type(e).__name__}){keep}",
                        code="replica_died"), [(b"retry-after", b"1")]
    if isinstance(e, DeploymentUnavailableError):
        return ApiError(503, f"no replica can answer: {e.message}", code="model_loading"), []
    log.error("forwarding failed: %r", e)
    return ApiError(500, f"internal error: {type(e).__name__}", code="internal_error"), []


# --- the application -------------------------------------------------------------------------------------------
def build_app(settings, options: RayOptions):
    """The Ray Serve application (deploy with `serve.run`) for server `settings` (`state_dir` must be a folder
    every replica reaches) and `options`."""
    if settings.state_dir is None:
        raise SinkstreamError("the Ray deployment needs a state folder (--state-dir / state_dir) that every "
                              "replica reaches")
    if options.affinity not in AFFINITIES:
        raise SinkstreamError(f"affinity must be one of {', '.join(AFFINITIES)}, not {options.affinity!r}")
    limits = settings.limits
    router = {}
    if options.affinity == "hash":
        router["request_router_config"] = RequestRouterConfig(
            request_router_class=SessionRouter,
            request_router_kwargs={"num_virtual_nodes": options.virtual_nodes, "num_fallback_replicas": 0})
    replica = serve.deployment(
        Replica, name="Replica", num_replicas=options.replicas,
        ray_actor_options={"num_cpus": options.cpus_per_replica},
        max_ongoing_requests=limits.max_batch + limits.max_queue,
        max_queued_requests=limits.max_queue * options.replicas,
        health_check_period_s=options.health_check_period_s, health_check_timeout_s=options.health_check_timeout_s,
        graceful_shutdown_timeout_s=5, graceful_shutdown_wait_loop_s=0.5, max_constructor_retry_count=2,
        **router)
    gateway = serve.deployment(
        serve.ingress()(Gateway), name="Gateway", num_replicas=options.gateways, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=4096, max_queued_requests=-1, graceful_shutdown_timeout_s=5,
        graceful_shutdown_wait_loop_s=0.5)
    return gateway.bind(replica.bind(settings, options), options, limits.max_body_bytes)


def options_from(args) -> RayOptions:
    """`RayOptions` from `sinkstream serve`'s parsed flags."""
    return RayOptions(replicas=args.replicas, cpus_per_replica=args.cpus_per_replica, affinity=args.affinity)


def parse_flags(argv: list[str]):
    """`sinkstream serve`'s flags parsed from `argv` -> (Settings, RayOptions)."""
    from .cli import build_parser
    from .server.cli import settings_from
    args = build_parser().parse_args(["serve", *argv])
    return settings_from(args), options_from(args)


def build(args: dict):
    """Ray Serve app builder: ``serve run sinkstream.deploy:build state_dir=/mnt/sessions replicas=4 model=...``
    or ``args:`` in a Serve config file. Keys are `sinkstream serve`'s flags (``-`` or ``_``); a flag without a
    value takes ``true``."""
    argv: list[str] = []
    for key, value in args.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True or str(value).lower() == "true":
            argv.append(flag)
        elif value is not False and str(value).lower() != "false":
            argv += [flag, str(value)]
    return build_app(*parse_flags(argv))


def __getattr__(name: str):
    """``sinkstream.deploy:app``: the application for the flags in ``$SINKSTREAM_SERVE_ARGS``."""
    if name == "app":
        return build_app(*parse_flags(shlex.split(os.environ.get("SINKSTREAM_SERVE_ARGS", ""))))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

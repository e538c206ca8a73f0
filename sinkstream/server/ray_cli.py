"""`sinkstream serve --ray`: the server's settings run as Ray Serve replicas (sinkstream.deploy).

Without --ray-address it starts a Ray cluster on this machine (this process is its driver; with a loopback
--host the node is 127.0.0.1 and Ray's servers listen on loopback, except the inter-deployment gRPC server
each Serve 2.60 replica binds on all interfaces, which Ray offers no setting for), otherwise it joins that
cluster. It starts Serve's HTTP proxy on --host/--port, deploys the application, prints the same
"serving ... on http://..." line as the single-machine server, and on SIGINT/SIGTERM shuts Serve down
(replicas finish within a few seconds; running turns roll back) and the cluster it started; on a cluster it
joined it deletes only its application. Without --state-dir the sessions go to a temporary folder on this
machine, removed at the end: enough for replicas here, not for a cluster (--ray-address needs --state-dir).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading

from ..errors import SinkstreamError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
OBJECT_STORE_BYTES = 256 << 20  # a local cluster's object store: requests and chunks only, no tensors


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_ray(args, settings) -> int:
    if not args.ray_address and args.host in LOOPBACK:
        # a cluster of this machine alone: Ray then names its node 127.0.0.1 and its servers listen there
        # (read when ray is imported; the setting Ray uses for single-machine clusters on macOS and Windows)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
        from ray import serve

        from ..deploy import APP_NAME, build_app, options_from
    except ModuleNotFoundError as e:
        raise SinkstreamError(f"--ray needs Ray Serve ({e.name} is missing): pip install 'sinkstream[ray]'") from None
    options = options_from(args)
    tmp = None
    if settings.state_dir is None:
        if args.ray_address:
            raise SinkstreamError("--ray-address needs --state-dir: a folder every node of the cluster mounts")
        tmp = tempfile.mkdtemp(prefix="sinkstream-sessions-")
        settings = dataclasses.replace(settings, state_dir=tmp)
    port = args.port or free_port(args.host)
    quiet = args.log_level not in ("info", "debug")
    if args.ray_address:
        ray.init(address=args.ray_address, log_to_driver=not quiet)
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, options.replicas * options.cpus_per_replica),
                 include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES, log_to_driver=not quiet)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": port},
                    logging_config={"log_level": args.log_level.upper()})
        try:
            serve.run(build_app(settings, options), name=APP_NAME, route_prefix="/")
        except RuntimeError as e:
            print(f"sinkstream: error: the deployment failed: {e}", file=sys.stderr, flush=True)
            return 2
        if not settings.api_key and args.host not in LOOPBACK:
            print("sinkstream: warning: listening beyond loopback without --api-key", file=sys.stderr)
        url_host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"sinkstream: serving {settings.model_id} on http://{url_host}:{port} "
              f"(Ray Serve, {options.replicas} replicas, {options.affinity} affinity, "
              f"cache {settings.cache.describe()}, sessions in {tmp and 'a temporary folder' or settings.state_dir})",
              file=sys.stderr, flush=True)
        while not stop.wait(1):
            pass
        return 0
    finally:
        try:
            if args.ray_address:
                serve.delete(APP_NAME)  # a cluster we joined keeps Serve and its other applications
            else:
                serve.shutdown()
        finally:
            if not args.ray_address:
                ray.shutdown()
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

"""The server app run in this process (uvicorn on a thread, a loopback port) with an already loaded model.

Unlike a subprocess server, tests can patch the process (a slow or full disk) and look at the store; unlike
starlette's TestClient, responses really stream, so tests can measure gaps between chunks.
"""
from __future__ import annotations

import socket
import threading
import time

import httpx


class AppServer:
    """`AppServer(settings, model_and_tokenizer)`; `.url`, `.state` (the app's ServerState), `.stop()`."""

    def __init__(self, settings, loaded, *, ready_timeout: float = 30):
        import uvicorn

        from sinkstream.server.app import create_app
        self.app = create_app(settings, loader=lambda *a, **k: loaded)
        self.state = self.app.state.sinkstream
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="error", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True,
                                       name="test-uvicorn")
        self.thread.start()
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("in-process server never became healthy")

    @property
    def store(self):
        return self.state.engine.store

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def shared_tiny_chat(tmp_path_factory):
    """(model, tokenizer) of serverkit's tiny chat model, its folder made once per test run."""
    import sinkstream
    from serverkit import tiny_chat_model
    folder = tiny_chat_model(tmp_path_factory.getbasetemp() / "tiny-chat-shared")
    return sinkstream.load(str(folder), device="cpu", quiet=True)

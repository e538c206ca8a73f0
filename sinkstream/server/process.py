"""`sinkstream serve` as a child process: what tests, benchmarks and scripts that drive a real server share.

`ServeProcess(args)` starts ``python -m sinkstream serve ARGS`` with its stderr read on a thread (kept in
``log``); ``url`` comes from the "serving ... on URL" line the server prints once it listens (so ``--port 0``
works). Imports nothing beyond the standard library until `wait_healthy` (httpx).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time


class ServeProcess:
    """``python -m sinkstream serve ARGS`` in a subprocess (its own process group with `new_session`)."""

    def __init__(self, args: list[str], *, env: dict | None = None, new_session: bool = False):
        self.cmd = [sys.executable, "-m", "sinkstream", "serve", *args]
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                     start_new_session=new_session)
        self.log: list[str] = []
        self.url: str | None = None
        self._found = threading.Event()
        threading.Thread(target=self._drain, daemon=True, name="serve-stderr").start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            m = re.search(r"serving \S+ on (http://\S+)", line)
            if m and self.url is None:
                self.url = m.group(1)
                self._found.set()

    def tail(self, n: int = 40) -> str:
        return "".join(self.log[-n:])

    def wait_url(self, timeout: float) -> None:
        """Until the server says where it listens; RuntimeError (with its log) if it exits or time runs out."""
        deadline = time.monotonic() + timeout
        while not self._found.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("server did not start:\n" + self.tail())

    def wait_healthy(self, timeout: float, *, on_status=None) -> None:
        """Until GET /health answers 200 (`on_status` sees every other status); RuntimeError otherwise."""
        import httpx
        deadline = time.monotonic() + timeout
        self.wait_url(timeout)
        while time.monotonic() < deadline:
            try:
                status = httpx.get(self.url + "/health", timeout=30).status_code
                if status == 200:
                    return
                if on_status is not None:
                    on_status(status)
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError("server never became healthy:\n" + self.tail())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def interrupt(self, timeout: float) -> bool:
        """SIGINT, as a user's Ctrl-C; whether the process ended within `timeout` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return False
        return True

    def kill(self, *, group: bool = False) -> None:
        """SIGKILL the process (and its process group with `group`) and reap it."""
        if group:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        elif self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 15, *, group: bool = False) -> None:
        """SIGINT, then SIGKILL if it is still there after `timeout` seconds."""
        if not self.interrupt(timeout):
            self.kill(group=group)

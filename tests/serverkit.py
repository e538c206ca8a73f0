"""Helpers for the server tests: a tiny random model folder with SmolLM2's tokenizer, and a real
`sinkstream serve` subprocess on a free loopback port."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch


def tiny_chat_model(path: Path) -> Path:
    """A 2-layer Llama with random weights and the default model's tokenizer and chat template."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import save_hf_folder
    from sinkstream.loading import tokenizer_for
    if (path / "config.json").exists():
        return path
    tok = tokenizer_for(None)
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=1,
                               eos_token_id=2, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    save_hf_folder(model, path, tok)
    return path


class Server:
    """`python -m sinkstream serve --port 0 ...` in a subprocess; `.url` once /health says 200."""

    def __init__(self, *args: str, ready_timeout: float = 90):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "sinkstream", "serve", "--port", "0", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
        self.log: list[str] = []
        self.url: str | None = None
        self.saw_loading = False
        found = threading.Event()

        def drain():
            for line in self.proc.stderr:
                self.log.append(line)
                m = re.search(r"serving \S+ on (http://\S+)", line)
                if m and self.url is None:
                    self.url = m.group(1)
                    found.set()

        threading.Thread(target=drain, daemon=True).start()
        deadline = time.monotonic() + ready_timeout
        while not found.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not start:\n" + "".join(self.log))
        while time.monotonic() < deadline:
            try:
                r = httpx.get(self.url + "/health", timeout=5)
                if r.status_code == 200:
                    return
                self.saw_loading |= r.status_code == 503
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("server never became healthy:\n" + "".join(self.log))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)

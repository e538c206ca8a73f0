"""Helpers for the server tests: a tiny random model folder with SmolLM2's tokenizer, and a real
`sinkstream serve` subprocess on a free loopback port."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

from sinkstream.server.process import ServeProcess


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


class Server(ServeProcess):
    """`python -m sinkstream serve --port 0 ...` in a subprocess; `.url` once /health says 200."""

    def __init__(self, *args: str, ready_timeout: float = 90):
        super().__init__(["--port", "0", *args], env={"OMP_NUM_THREADS": "1"})
        self.saw_loading = False

        def seen(status: int) -> None:
            self.saw_loading |= status == 503
        try:
            self.wait_healthy(ready_timeout, on_status=seen)
        except BaseException:
            self.stop()
            raise

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

"""Tiny random Llama models for the eval-harness tests (no downloads): in memory, or as a HF folder with the
default model's tokenizer so the CLI can load it by path."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from sinkstream.models import model_class


def tiny_config(**overrides) -> dict:
    cfg = dict(model_type="llama", vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0,
               rms_norm_eps=1e-6, tie_word_embeddings=True)
    cfg.update(overrides)
    return cfg


def tiny_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return model_class("llama").from_hf_config(tiny_config(**overrides)).eval().requires_grad_(False)


def tiny_folder(path: Path, **overrides) -> Path:
    """A loadable HF-style folder: config.json, model.safetensors, and the default model's tokenizer files."""
    from safetensors.torch import save_file

    from sinkstream.loading import tokenizer_for
    path.mkdir(parents=True, exist_ok=True)
    model = tiny_model(**overrides)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(tiny_config(**overrides)))
    tokenizer_for(None).save_pretrained(str(path))
    return path

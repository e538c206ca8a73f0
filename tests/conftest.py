import json

import pytest
import torch

torch.set_grad_enabled(False)

# Tiny configs of real families (same keys their config.json files use), random weights, no downloads.
TINY_BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6)
LLAMA_VARIANTS = {
    "llama": dict(model_type="llama", tie_word_embeddings=False),
    "smollm2-tied": dict(model_type="llama", tie_word_embeddings=True, rope_theta=100000.0),
    "llama3-rope": dict(model_type="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 64}),
    "linear-rope": dict(model_type="llama", rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", head_dim=24),
    "mistral": dict(model_type="mistral", sliding_window=None),
}


def hf_tiny(variant: str, seed: int = 0):
    """A transformers model of a tiny config of `variant` with random weights (fp32, eval)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    d = {**TINY_BASE, **LLAMA_VARIANTS[variant]}
    mt = d.pop("model_type")
    cfg = AutoConfig.for_model(mt, **d)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # larger random weights make attention patterns sharper than init's tiny std
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    return model


def ours_from_hf(hf):
    from sinkstream.loading import build_model
    return build_model(hf.config.to_dict(), hf.state_dict())


@pytest.fixture(scope="session")
def tiny():
    hf = hf_tiny("llama")
    return ours_from_hf(hf)


def save_hf_folder(hf, path, tokenizer=None):
    from safetensors.torch import save_file
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    save_file(sd, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(hf.config.to_dict(), default=str))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def real():
    """The default model (SmolLM2-135M-Instruct, de-quantized GGUF), fp32 on CPU."""
    import sinkstream
    return sinkstream.load(device="cpu", dtype="float32", quant="none", quiet=True)  # float: parity tests


@pytest.fixture(scope="session")
def sample_text():
    from pathlib import Path

    import sinkstream
    return (Path(sinkstream.__file__).parent / "data" / "pride_and_prejudice_excerpt.txt").read_text()

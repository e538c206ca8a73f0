"""sinks: recomputed attention weights match transformers' eager attentions; sink ratio; errors; CLI JSON."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _eval_tiny import tiny_config, tiny_folder  # noqa: E402

from sinkstream.cli import main  # noqa: E402
from sinkstream.errors import SinkstreamError  # noqa: E402
from sinkstream.eval import sinks  # noqa: E402
from sinkstream.loading import build_model  # noqa: E402


def test_masses_match_transformers_attentions():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = tiny_config(vocab_size=256, max_position_embeddings=128)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="eager")).eval()
    ours = build_model(cfg, hf.state_dict())
    ids = torch.randint(0, 256, (48,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        att = hf(ids[None], output_attentions=True).attentions  # per layer [1, heads, n, n]
    res = sinks.analyze(ours, ids, tokens=48, samples=1, first_k=4, epsilon=0.3)
    for li, a in enumerate(att):
        want_first = a[0, :, 4:, 0].mean(-1)
        want_k = a[0, :, 4:, :4].sum(-1).mean(-1)
        assert torch.allclose(torch.tensor(res["layers"][li]["first_mass"]), want_first, atol=1e-3)
        assert torch.allclose(torch.tensor(res["layers"][li]["first_k_mass"]), want_k, atol=1e-3)
    n_sink = sum(int((torch.tensor(layer["first_mass"]) > 0.3).sum()) for layer in res["layers"])
    assert res["sink_heads"] == n_sink and res["sink_ratio"] == n_sink / res["heads_total"]


def test_not_a_llama_layout():
    with pytest.raises(SinkstreamError, match="Llama-style"):
        sinks.analyze(torch.nn.Linear(2, 2), torch.arange(10))


def test_cli_json(tmp_path, capsys):
    folder = tiny_folder(tmp_path / "tiny")
    rc = main(["sinks", "--model", str(folder), "--tokens", "40", "--samples", "2", "--json", "-q",
               "--out", str(tmp_path / "out")])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["samples"] == 2 and len(res["layers"]) == 2 and len(res["layers"][0]["first_mass"]) == 4
    assert 0 <= res["sink_ratio"] <= 1
    assert (tmp_path / "out" / "sinks_heatmap.png").exists()

"""`sinkstream sinks`: where attention goes, per layer and head ("When Attention Sink Emerges", Gu et al.).

The engine attends with SDPA and never materialises attention weights, so this recomputes them: a
forward pre-hook on every attention module takes the layer's input, applies the layer's own q/k
projections (and q/k norms), rotates with the model's one `Rotary` at the positions of that layer's
plan, and applies the plan's mask. Works for every family that follows llama.py's names
(``model.layers[i].self_attn`` with ``q_proj``, ``k_proj``, ``heads``, ``kv_heads``, ``head_dim``, and
``model.rotary``); others get a clear error.

Reported per head: mean attention mass on the first token, and on the first k tokens, averaged over the
queries at positions >= k (earlier queries have nowhere else to look). A head is a sink head when its
first-token mass exceeds epsilon; the sink ratio is the share of such heads.
"""
from __future__ import annotations

import torch

from ..errors import SinkstreamError
from ..rope import apply_rotary

_NEEDS = ("q_proj", "k_proj", "heads", "kv_heads", "head_dim")


def attention_modules(model) -> list:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or getattr(model, "rotary", None) is None or not all(
            hasattr(getattr(layer, "self_attn", None), a) for layer in layers for a in _NEEDS):
        raise SinkstreamError(
            f"sinks analysis needs a Llama-style model (model.layers[i].self_attn with {', '.join(_NEEDS)}, and "
            f"model.rotary); {type(model).__name__} does not follow that layout")
    return [layer.self_attn for layer in layers]


def _weights(attn, rotary, x: torch.Tensor, plan) -> torch.Tensor:
    """Attention probabilities [heads, n, n] of one layer for a fresh pass over x [1, n, hidden]."""
    b, n, _ = x.shape
    q = attn.q_proj(x).view(b, n, attn.heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, n, attn.kv_heads, attn.head_dim).transpose(1, 2)
    if getattr(attn, "qk_norm", False):
        q, k = attn.q_norm(q), attn.k_norm(k)
    inter = rotary.cfg.interleaved
    cq, sq = rotary.tables(plan.q_pos, torch.float32)
    ck, sk = rotary.tables(plan.k_pos, torch.float32)
    q = apply_rotary(q.float(), cq, sq, interleaved=inter)[0]
    k = apply_rotary(k.float(), ck, sk, interleaved=inter)[0]
    k = k.repeat_interleave(attn.heads // attn.kv_heads, dim=0)
    scores = (q @ k.transpose(-1, -2)) * getattr(attn, "scale", attn.head_dim ** -0.5)
    causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    visible = causal if plan.mask is None else causal & plan.mask.to(x.device)
    return scores.masked_fill(~visible, float("-inf")).softmax(-1)


@torch.inference_mode()
def analyze(model, ids: torch.Tensor, *, tokens: int = 512, samples: int = 2, first_k: int = 4,
            epsilon: float = 0.3) -> dict:
    """First-token and first-k attention mass per layer and head, averaged over `samples` segments."""
    mods = attention_modules(model)
    rotary = model.rotary
    segments = [ids[i * tokens:(i + 1) * tokens] for i in range(samples)]
    segments = [s for s in segments if len(s) > first_k]
    if not segments:
        raise SinkstreamError(f"need more than {first_k} tokens of text for the sinks analysis")
    first = torch.zeros(len(mods), mods[0].heads, dtype=torch.float64)
    first_k_mass = torch.zeros_like(first)

    def hook_for(li, attn):
        def hook(module, args):
            x, _, plan = args[:3]
            if plan.start != 0 or len(plan.k_tokens) != x.shape[1]:
                raise RuntimeError("sinks analysis expects one fresh pass per segment")
            p = _weights(attn, rotary, x, plan)[:, first_k:]  # queries that can look past the first k
            first[li] += p[..., 0].mean(-1).double().cpu()
            first_k_mass[li] += p[..., :first_k].sum(-1).mean(-1).double().cpu()
        return hook

    handles = [m.register_forward_pre_hook(hook_for(i, m)) for i, m in enumerate(mods)]
    try:
        for seg in segments:
            model(seg.view(1, -1).to(model.device))
    finally:
        for h in handles:
            h.remove()
    first /= len(segments)
    first_k_mass /= len(segments)
    layers = []
    for li in range(len(mods)):
        layers.append({"layer": li, "first_mass": [round(v, 4) for v in first[li].tolist()],
                       "first_k_mass": [round(v, 4) for v in first_k_mass[li].tolist()],
                       "mean_first_mass": float(first[li].mean()), "max_first_mass": float(first[li].max()),
                       "mean_first_k_mass": float(first_k_mass[li].mean()),
                       "sink_heads": int((first[li] > epsilon).sum())})
    sink_heads = int((first > epsilon).sum())
    return {"tokens": min(tokens, max(len(s) for s in segments)), "samples": len(segments), "first_k": first_k,
            "epsilon": epsilon, "sink_ratio": sink_heads / first.numel(), "sink_heads": sink_heads,
            "heads_total": first.numel(), "mean_first_mass": float(first.mean()),
            "mean_first_k_mass": float(first_k_mass.mean()), "layers": layers}


def mass_matrix(result: dict):
    """[layers, heads] first-token mass as a nested list-backed tensor (for the heatmap)."""
    return torch.tensor([layer["first_mass"] for layer in result["layers"]]).numpy()


def rows(result: dict) -> list[dict]:
    """One CSV row per layer and head."""
    return [{"layer": layer["layer"], "head": h, "first_mass": fm, f"first_{result['first_k']}_mass": fk}
            for layer in result["layers"] for h, (fm, fk) in enumerate(zip(layer["first_mass"], layer["first_k_mass"]))]

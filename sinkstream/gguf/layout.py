"""The machinery `arch` describes files with: typed metadata access, the config keys every architecture
shares, and the mapping of a file's tensor names onto ours (`Source`: which tensors, reordered, shifted)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import ModelLoadError


@dataclass(frozen=True)
class Source:
    """How one of our tensors is made: these GGUF tensors' rows stacked in order, then put in the order
    `rows` gives (undoing a reordering by llama.cpp's converter), then `shift` added to every value."""
    parts: tuple[str, ...]
    rows: torch.Tensor | None = None
    shift: float = 0.0


@dataclass
class Layout:
    """An opened file in our terms: the config dict our families read, and our name -> `Source`."""
    config: dict
    sources: dict[str, Source] = field(default_factory=dict)


class Metadata:
    """A file's key-value metadata (read on request), its tensors' shapes in torch order, and a reader of
    small tensors that carry configuration (RoPE factors)."""

    def __init__(self, arch: str, value: Callable[[str], Any], shapes: dict[str, tuple[int, ...]],
                 read: Callable[[str], torch.Tensor]):
        self.arch, self._value, self.shapes, self.read = arch, value, shapes, read

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``{arch}.{key}``, or `default` when the file does not have it."""
        v = self._value(f"{self.arch}.{key}")
        return default if v is None else v

    def general(self, key: str) -> Any:
        return self._value(key)

    def count(self, key: str, default: int | None = None) -> int:
        """An integer hyperparameter that must be one number for the whole model."""
        v = self.get(key, default)
        if v is None:
            raise ModelLoadError(f"the GGUF metadata has no {self.arch}.{key}")
        if isinstance(v, (list, tuple)):
            if len(set(v)) != 1:
                raise ModelLoadError(f"{self.arch}.{key} varies per layer ({v[:4]}...); sinkstream does not "
                                     "support such models")
            v = v[0]
        return int(v)

    def rows(self, name: str) -> int:
        if name not in self.shapes:
            raise ModelLoadError(f"the GGUF has no tensor {name}")
        return self.shapes[name][0]

    def has(self, stem: str) -> bool:
        """Whether tensor `stem` exists (``blk.0.attn_q.bias``), or any block has it (``*.attn_q.bias``)."""
        if stem.startswith("*."):
            return any(n.startswith("blk.") and n.split(".", 2)[2] == stem[2:] for n in self.shapes)
        return stem in self.shapes


def fraction(part: int, whole: int) -> float:
    """part / whole such that int(whole * fraction) == part, as the families compute rotary dims."""
    f = part / whole
    return f if int(whole * f) == part else (part + 0.5) / whole


def common_config(m: Metadata, model_type: str) -> dict:
    hidden, heads = m.count("embedding_length"), m.count("attention.head_count")
    cfg = dict(model_type=model_type, vocab_size=m.rows("token_embd.weight"), hidden_size=hidden,
               num_hidden_layers=m.count("block_count"), num_attention_heads=heads,
               num_key_value_heads=m.count("attention.head_count_kv", heads),
               tie_word_embeddings="output.weight" not in m.shapes)
    if m.get("context_length") is not None:
        cfg["max_position_embeddings"] = m.count("context_length")
    for ours, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        if m.general(f"tokenizer.ggml.{key}") is not None:
            cfg[ours] = int(m.general(f"tokenizer.ggml.{key}"))
    return cfg


def rope_scaling(m: Metadata) -> dict | None:
    """The HF rope_scaling dict of linear scaling; other metadata-declared kinds are refused."""
    kind, factor = m.get("rope.scaling.type"), m.get("rope.scaling.factor")
    if kind is None and m.get("rope.scale_linear", 1.0) != 1.0:  # the key older converters wrote
        kind, factor = "linear", m.get("rope.scale_linear")
    if kind in (None, "none"):
        return None
    if kind == "linear" and factor is not None:
        return {"rope_type": "linear", "factor": float(factor)}
    raise ModelLoadError(f"RoPE scaling {kind!r} is not supported (sinkstream runs linear, llama3 and longrope)")


def map_names(m: Metadata, top: dict[str, str], block: dict[str, str | tuple[str, int]], prefix: str, *,
           rows: dict[str, torch.Tensor] | None = None, shift: Callable[[str], float] = lambda key: 0.0,
           consumed: tuple[str, ...] = ()) -> dict[str, Source]:
    """Map every tensor of the file to one of ours. `top` maps names outside blocks (without .weight/.bias),
    `block` the keys inside ``blk.N.`` to ours under ``{prefix}.N.``; a (name, i) value makes part i of a
    stacked tensor. `rows` reorders our tensor of that key; `shift(gguf_key)` is added to its values."""
    rows = rows or {}
    parts: dict[str, list[tuple[int, str]]] = {}
    extra: dict[str, tuple[torch.Tensor | None, float]] = {}
    unknown = []
    for name in m.shapes:
        if name in consumed:
            continue
        stem, _, suffix = name.rpartition(".")
        if stem.startswith("blk."):
            _, layer, key = stem.split(".", 2)
            target = block.get(key)
            where = f"{prefix}.{layer}."
        else:
            key, target, where = stem, top.get(stem), ""
        if target is None or suffix not in ("weight", "bias"):
            unknown.append(name)
            continue
        ours_key, index = (target, 0) if isinstance(target, str) else target
        ours = f"{where}{ours_key}.{suffix}"
        parts.setdefault(ours, []).append((index, name))
        extra[ours] = (rows.get(ours_key), shift(key))
    if unknown:
        raise ModelLoadError(f"tensors {', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''} of this "
                             f"{m.arch} GGUF have no place in sinkstream's model (an unsupported variant)")
    return {ours: Source(tuple(n for _, n in sorted(p)), *extra[ours]) for ours, p in parts.items()}

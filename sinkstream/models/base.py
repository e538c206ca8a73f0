"""What every model family shares: building from a config dict, the cache hook-up, norms."""
from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..attention import Packed
from ..cache import CacheConfig, LayerSpec, make_cache


def embedding(vocab: int, dim: int) -> nn.Embedding:
    """An ``nn.Embedding`` whose weights are drawn (N(0, 1), as torch does) except on the meta device, where
    the loader builds the skeleton it fills: drawing random numbers on meta tensors imports torch._dynamo
    (0.75 s here) for nothing."""
    weight = torch.empty(vocab, dim)
    if weight.device.type != "meta":
        nn.init.normal_(weight)
    return nn.Embedding(vocab, dim, _weight=weight)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32. `offset=1` for Gemma, whose weights are stored minus one."""

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32 and x.device.type == "cpu" and kernels.available():
            # one pass in our kernel: torch's fused CPU rms_norm costs ~13 us a row and 12 ms for 512 rows
            return torch.ops.sinkstream.rms_norm(x.contiguous(), self.weight, self.eps, self.offset)
        if x.dtype == torch.float32 and not self.offset:  # one fused kernel for the same formula
            return torch.nn.functional.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (xf * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * xf.to(x.dtype)


class CausalLM(nn.Module):
    """Base of every family. Subclasses build their layers and implement `layer_specs` and `forward_layers`.

    `forward(input_ids, cache)` -> float32 logits [batch, n, vocab] (``last_only``: [batch, 1, vocab], the
    vocabulary projection of the last position only, as prefill needs). Without a cache the pass is plain
    causal attention over input_ids (a throwaway dense cache), which is what the parity tests compare.
    """

    config = None  # the family's config dataclass
    # Weight tying: dotted names of the input embedding and the output head, whose weights are one matrix
    # when `tied`. Families name their modules; the tying itself is done here only.
    embedding_module = "model.embed_tokens"
    head_module = "lm_head"

    @property
    def tied(self) -> bool:
        """Whether the output head shares the input embedding's matrix (``tie_word_embeddings``)."""
        return bool(self.config.tie_word_embeddings)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def max_context(self) -> int:
        return int(self.config.max_position_embeddings)

    def layer_specs(self) -> list[LayerSpec]:
        raise NotImplementedError

    def make_cache(self, config: CacheConfig | None = None, *, batch: int = 1):
        return make_cache(self, config, batch=batch)

    def forward(self, input_ids: torch.Tensor, cache=None, *, last_only: bool = False) -> torch.Tensor:
        if cache is None:
            from ..cache import StreamCache
            cache = StreamCache(CacheConfig("dense"), self.layer_specs(), batch=input_ids.shape[0],
                                dtype=self.dtype, device=self.device, max_context=input_ids.shape[1])
        n = input_ids.shape[1]
        plans = cache.begin(n)
        return self.forward_layers(input_ids, cache.layers, plans, slice(n - 1, n) if last_only else None).float()

    def forward_packed(self, input_ids: torch.Tensor, bounds: list[int], layers: list[list], plans: list[list],
                       rows: torch.Tensor | None = None) -> torch.Tensor:
        """One pass over several caches' new tokens packed along the sequence axis: input_ids [1, N], cache i's
        tokens at ``bounds[i]:bounds[i + 1]``, ``layers[i]``/``plans[i]`` its layer caches and the plans its
        `begin` returned for this pass -> float32 logits [1, len(rows), vocab] (every position when rows is None).
        """
        memo: dict = {}  # shared by the layers: what a pass derives from its plans is derived once
        packed = [Packed(bounds, [ls[j] for ls in layers], [ps[j] for ps in plans], memo)
                  for j in range(len(layers[0]))]
        return self.forward_layers(input_ids, packed, [None] * len(packed), rows).float()

    def forward_layers(self, input_ids, kv_layers, plans, rows=None) -> torch.Tensor:
        """Logits [batch, n or len(rows), vocab] for the positions `rows` selects (None: all), in the
        model's dtype; each layer attends through ``cached_attention(kv_layers[i], plans[i], ...)``."""
        raise NotImplementedError

    def prepare_state_dict(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map a HF state dict onto this module's names. Families that fuse or rename tensors override this
        and end with ``super().prepare_state_dict(sd)``: a tied (or absent) head takes the embedding."""
        head, embedding = f"{self.head_module}.weight", f"{self.embedding_module}.weight"
        if self.tied or head not in sd:
            sd[head] = sd[embedding]
        return sd

    def tie_weights(self) -> None:
        """Share the embedding's matrix with the head when `tied`: when a family has built its modules, and
        again after loading (which assigns new Parameters)."""
        if self.tied:
            self.get_submodule(self.head_module).weight = self.get_submodule(self.embedding_module).weight

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "CausalLM":
        return cls(cls.config_class.from_dict(cfg))

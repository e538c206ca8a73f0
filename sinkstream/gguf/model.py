"""`open_gguf`: a GGUF file as a config, our tensor names, and tensors read one at a time from the map."""
from __future__ import annotations

import mmap
import os
from pathlib import Path

from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType
from gguf.gguf_reader import ReaderField

from ..errors import ModelLoadError, SinkstreamError
from ..quant import QuantWeight
from .arch import ARCHITECTURES, describe
from .layout import Metadata, Source


class GGUFModel:
    """A GGUF file, memory-mapped, in our terms. `config` is the HF-style config dict our families read;
    `names()` our state-dict names of its tensors; `load(name)` reads one of them now, with llama.cpp's
    transformations undone. Nothing else reads tensor data."""

    def __init__(self, path: Path, reader, config: dict, sources: dict[str, Source]):
        self.path, self.config = path, config
        self.architecture = str(reader.fields["general.architecture"].contents())
        self._reader, self._sources = reader, sources
        self._tensors = {t.name: t for t in reader.tensors}

    def __repr__(self) -> str:
        return f"GGUFModel({str(self.path)!r}, {self.architecture}, {len(self._sources)} tensors)"

    def names(self) -> list[str]:
        """Our (HF-style) state-dict names of every tensor of the model in the file."""
        return list(self._sources)

    def load(self, name: str, *, native: bool = True) -> torch.Tensor | QuantWeight:
        """Tensor `name` (one of `names()`), read now. native=True: float tensors in their file dtype,
        matrices of quantized types as `QuantWeight` (sinkstream.gguf.quants.decode); native=False: float32."""
        if name not in self._sources:
            raise KeyError(f"{name!r} is not a tensor of {self.path.name}")
        src = self._sources[name]
        x = _stack([self._read(p, native) for p in src.parts])
        if src.rows is not None:
            x = x.rows(src.rows) if isinstance(x, QuantWeight) else x[src.rows]
        if src.shift:
            x = x.float() + src.shift
        return x

    def tokenizer_folder(self) -> Path:
        """A folder that sinkstream.tokenizer.load_tokenizer reads: the tokenizer and chat template in the
        file's metadata (built once, then cached)."""
        from .tokenizer import tokenizer_folder
        return tokenizer_folder(self.path, int(self._reader.data_offset), self.config.get("model_type"))

    def _read(self, gguf_name: str, native: bool) -> torch.Tensor | QuantWeight:
        from . import quants
        t = self._tensors[gguf_name]
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # GGUF lists the fastest dimension first
        try:
            if native:
                return quants.decode(gguf_name, t.tensor_type, shape, t.data)
            return quants.dequantize(gguf_name, t.tensor_type, shape, t.data)
        finally:
            self._reader.release(int(t.data_offset), int(t.n_bytes))


class _Array(ReaderField):
    """A metadata array (a vocabulary, its scores and types, merges) held as one slice of the map, decoded when
    `contents()` asks: GGUFReader makes a numpy view per element, a second for a 49k-token vocabulary."""

    def contents(self, index_or_slice: int | slice = slice(None)) -> Any:
        items = self.parts[-1]
        if self.types[-1] != GGUFValueType.STRING:
            return items.tolist()[index_or_slice]
        blob, out, at = items.tobytes(), [], 0
        for _ in range(int(self.parts[-2][0])):
            n = int.from_bytes(blob[at:at + 8], "little")
            out.append(blob[at + 8:at + 8 + n].decode("utf-8"))
            at += 8 + n
        return out[index_or_slice]


class _Reader(GGUFReader):
    """GGUFReader over a plain ndarray view of its memory map: parsing slices the map once per metadata item
    (a million times for a 262k-token vocabulary), and np.memmap's per-slice bookkeeping makes that 3-4x
    slower; arrays are not split into elements at all (`_Array`). The view keeps the map open; nothing is
    read into memory."""

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        if raw_type != GGUFValueType.ARRAY or self.byte_order == "S":
            return super()._get_field_parts(orig_offs, raw_type)
        itype, alen = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        sub, start, count = GGUFValueType(int(itype[0])), orig_offs + 12, int(alen[0])
        if sub == GGUFValueType.STRING:
            at, view = start, memoryview(self._array)
            for _ in range(count):
                at += 8 + int.from_bytes(view[at:at + 8], "little")
            if at > len(self._array):
                raise ValueError(f"string array at {orig_offs} runs past the end of the file")
            items = self._array[start:at]
        elif sub in self.gguf_scalar_to_np:
            items = self._get(start, self.gguf_scalar_to_np[sub], count)
            if len(items) != count:
                raise ValueError(f"array at {orig_offs} runs past the end of the file")
            at = start + items.nbytes
        else:  # arrays of arrays
            return super()._get_field_parts(orig_offs, raw_type)
        return at - orig_offs, [itype, alen, items], [], [GGUFValueType.ARRAY, sub]

    def _build_fields(self, offs: int, count: int) -> int:
        offs = super()._build_fields(offs, count)
        for name, f in list(self.fields.items()):
            if len(f.types) == 2 and f.types[0] == GGUFValueType.ARRAY and not f.data:
                self.fields[name] = _Array(*f)
        return offs

    @property
    def data(self):
        return self._array

    @data.setter
    def data(self, value):
        self._map = getattr(value, "_mmap", None)
        self._array = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    def release(self, start: int, length: int) -> None:
        """Drop the map's pages of bytes start..start+length from this process (they stay in the page cache):
        a tensor's file pages count once while it is converted, not until the whole file is read."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        lo = start - start % mmap.PAGESIZE
        hi = min(len(self._map), start + length + (-(start + length)) % mmap.PAGESIZE)
        if hi > lo:
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _stack(parts: list) -> torch.Tensor | QuantWeight:
    """Rows of several tensors in one; quantized parts of different forms are stacked as float32."""
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, QuantWeight) for p in parts) and len({(p.kind, p.group) for p in parts}) == 1:
        return QuantWeight.concat(parts)
    return torch.cat([p.dequantize() if isinstance(p, QuantWeight) else p.float() for p in parts])


def _value(reader):
    def value(key: str):
        f = reader.fields.get(key)
        return None if f is None else f.contents()
    return value


def open_gguf(path: str | os.PathLike) -> GGUFModel:
    """Open a GGUF file: parse its header and metadata (memory-mapped: no tensor is read or de-quantized).
    Raises ModelLoadError, in one line, for a file that is not GGUF, truncated or damaged, of an unsupported
    architecture or variant, or holding a tensor type sinkstream cannot read."""
    from . import quants
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror or e}") from None
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (bad magic {magic!r}); is it corrupt?")
    try:
        reader = _Reader(str(path), "r")
    except Exception as e:  # noqa: BLE001 - it fails on damage anywhere, tensor data cut short included
        raise ModelLoadError(f"{path} is truncated or corrupt ({type(e).__name__}: {e})") from None
    field = reader.fields.get("general.architecture")
    arch = None if field is None else str(field.contents())
    if arch not in ARCHITECTURES:
        raise ModelLoadError(f"{path}: unsupported GGUF architecture {arch!r} (supported: "
                             f"{', '.join(sorted(ARCHITECTURES))})")
    for t in reader.tensors:
        if t.tensor_type.name not in quants.SUPPORTED_TYPES:
            raise ModelLoadError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which sinkstream cannot "
                                 f"read (supported: {', '.join(quants.SUPPORTED_TYPES)})")
    tensors = {t.name: t for t in reader.tensors}
    shapes = {t.name: tuple(int(s) for s in reversed(t.shape.tolist())) for t in reader.tensors}

    def read_small(name: str) -> torch.Tensor:
        t = tensors[name]
        return quants.dequantize(name, t.tensor_type, shapes[name], t.data)

    try:
        layout = describe(Metadata(arch, _value(reader), shapes, read_small))
        _check_fits(layout.config, list(layout.sources))
    except ModelLoadError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    except (SinkstreamError, KeyError, ValueError, TypeError) as e:
        raise ModelLoadError(f"{path}: {arch} model sinkstream cannot run: {e}") from None
    return GGUFModel(path, reader, layout.config, layout.sources)


def _check_fits(config: dict, names: list[str]) -> None:
    """Our family builds from `config` (on the meta device: no memory) and its weights are exactly `names`;
    a file tensor the model has no place for is a variant the family does not implement."""
    from ..models import model_class
    with torch.device("meta"):
        model = model_class(config["model_type"]).from_hf_config(config)
    expected = set(model.state_dict())
    given = set(model.prepare_state_dict({n: n for n in names}))  # names stand in for the tensors
    extra, missing = sorted(given - expected), sorted(expected - given)
    if extra:
        raise ModelLoadError(f"tensors {', '.join(extra[:3])} have no place in sinkstream's {config['model_type']} "
                             "model (an unsupported variant)")
    if missing:
        raise ModelLoadError(f"the file lacks {len(missing)} tensors the model needs, e.g. {', '.join(missing[:3])}")

"""Where the retrieval memory keeps evicted blocks: CPU RAM up to a byte budget, then files on disk.

Blocks are keyed by (layer, block index); block ``n`` of every layer covers the same stream tokens. Blocks
arrive in order. While the RAM blocks exceed ``budget`` bytes the oldest ones are written out, a *segment*
of consecutive block indices (every layer) per file, and read back through a memory map. A small LRU of
blocks read from disk keeps hot blocks in RAM, and `madvise(DONTNEED)` after each read keeps mapped pages
from piling up in the process's resident set. RAM use is therefore bounded by ``budget`` + the hot cache,
however long the stream. The files are scratch space: they are removed when the store is closed or
garbage-collected (a saved session carries its blocks in its own file).
"""
from __future__ import annotations

import mmap
import os
import shutil
import tempfile
import weakref
from collections import OrderedDict
from pathlib import Path

import torch

MAX_OPEN_MAPS = 16  # open segment maps kept (each holds a file descriptor)


class BlockStore:
    """K/V blocks of every layer: k [kv_heads, block, head_dim], v [kv_heads, block, v_head_dim], on the CPU."""

    def __init__(self, layers: int, kv_heads: int, block_size: int, head_dim: int, v_head_dim: int, *,
                 dtype: torch.dtype, budget: int | None = None, directory: str | os.PathLike | None = None,
                 hot_blocks: int = 256):
        self.layers = layers
        self.k_shape = (kv_heads, block_size, head_dim)
        self.v_shape = (kv_heads, block_size, v_head_dim)
        self.dtype = dtype
        esize = torch.empty(0, dtype=dtype).element_size()
        self.k_bytes = kv_heads * block_size * head_dim * esize
        self.block_bytes = self.k_bytes + kv_heads * block_size * v_head_dim * esize  # one layer
        self.budget, self.directory, self.hot_blocks = budget, directory, hot_blocks
        # Segments small next to the budget, so RAM overshoots it by little when one is written out.
        per_index = self.block_bytes * layers
        self.segment_blocks = 256 if budget is None else max(1, min(256, budget // (4 * per_index)))
        self.ram: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.ram_bytes = 0
        self.spilled = 0   # block indices [0, spilled) live on disk
        self.count = [0] * layers  # blocks stored per layer
        self.hot: OrderedDict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.maps: OrderedDict[int, tuple[object, mmap.mmap]] = OrderedDict()
        self.folder: Path | None = None
        self._finalizer = None

    # --- writing ------------------------------------------------------------------------------------
    def put(self, layer: int, index: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if index != self.count[layer]:
            raise ValueError(f"layer {layer}: block {index} stored out of order (expected {self.count[layer]})")
        self.ram[(layer, index)] = (k.detach().to("cpu", self.dtype).contiguous(),
                                    v.detach().to("cpu", self.dtype).contiguous())
        self.ram_bytes += self.block_bytes
        self.count[layer] += 1

    def enforce_budget(self) -> None:
        """Write the oldest whole segments to disk while RAM holds more than the budget (call between passes)."""
        if self.budget is None:
            return
        done = min(self.count)  # indices every layer has stored
        while self.ram_bytes > self.budget and self.spilled + self.segment_blocks <= done:
            self._write_segment(self.spilled // self.segment_blocks)

    def _ensure_folder(self) -> Path:
        if self.folder is None:
            parent = None if self.directory is None else Path(self.directory)
            if parent is not None:
                parent.mkdir(parents=True, exist_ok=True)
            self.folder = Path(tempfile.mkdtemp(prefix="sinkstream-memory-", dir=parent))
            self._finalizer = weakref.finalize(self, _remove, self.folder, self.maps)
        return self.folder

    def _segment_path(self, seg: int) -> Path:
        return self._ensure_folder() / f"seg{seg:07d}.kv"

    def _offset(self, layer: int, index: int) -> int:
        # A segment file: for each layer, for each block of the segment, k bytes then v bytes.
        return (layer * self.segment_blocks + index % self.segment_blocks) * self.block_bytes

    def _write_segment(self, seg: int) -> None:
        first = seg * self.segment_blocks
        path = self._segment_path(seg)
        with open(path, "wb") as f:
            for layer in range(self.layers):
                for index in range(first, first + self.segment_blocks):
                    k, v = self.ram.pop((layer, index))
                    f.write(k.view(torch.uint8).numpy().data)
                    f.write(v.view(torch.uint8).numpy().data)
                    self.ram_bytes -= self.block_bytes
        self.spilled = first + self.segment_blocks

    # --- reading ------------------------------------------------------------------------------------
    def get(self, layer: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block `index` of `layer` as CPU tensors (do not modify them)."""
        if index >= self.count[layer]:
            raise IndexError(f"layer {layer} has {self.count[layer]} blocks, asked for {index}")
        kv = self.ram.get((layer, index))
        if kv is not None:
            return kv
        key = (layer, index)
        kv = self.hot.get(key)
        if kv is not None:
            self.hot.move_to_end(key)
            return kv
        kv = self._read(layer, index)
        self.hot[key] = kv
        while len(self.hot) > self.hot_blocks:
            self.hot.popitem(last=False)
        return kv

    def _map(self, seg: int) -> mmap.mmap:
        if seg in self.maps:
            self.maps.move_to_end(seg)
            return self.maps[seg][1]
        f = open(self._segment_path(seg), "rb")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.maps[seg] = (f, mm)
        while len(self.maps) > MAX_OPEN_MAPS:
            _, (old_f, old_mm) = self.maps.popitem(last=False)
            old_mm.close()
            old_f.close()
        return mm

    def _read(self, layer: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        mm = self._map(index // self.segment_blocks)
        off = self._offset(layer, index)
        raw = torch.frombuffer(bytearray(mm[off:off + self.block_bytes]), dtype=torch.uint8)
        # Drop the pages just read from this process's resident set (they stay in the page cache).
        start = off - off % mmap.PAGESIZE
        mm.madvise(mmap.MADV_DONTNEED, start, min(len(mm), off + self.block_bytes) - start)
        k = raw[:self.k_bytes].view(self.dtype).view(self.k_shape)
        v = raw[self.k_bytes:].view(self.dtype).view(self.v_shape)
        return k, v

    # --- accounting ---------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of block K/V held in RAM (the budgeted part plus the hot cache)."""
        return self.ram_bytes + len(self.hot) * self.block_bytes

    @property
    def disk_bytes(self) -> int:
        return self.spilled * self.layers * self.block_bytes

    def close(self) -> None:
        """Remove the scratch files (the store is unusable afterwards)."""
        if self._finalizer is not None:
            self._finalizer()


def _remove(folder: Path, maps: OrderedDict) -> None:
    for f, mm in maps.values():
        mm.close()
        f.close()
    maps.clear()
    shutil.rmtree(folder, ignore_errors=True)

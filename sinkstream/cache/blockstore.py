"""Where the retrieval memory keeps fixed-size blocks: CPU RAM up to a byte budget, then a file on disk.

Blocks are keyed by (layer, block index); block ``n`` of every layer covers the same stream tokens. Blocks
arrive in order. While the RAM blocks exceed ``budget`` bytes the oldest ones are written out, a *segment*
of consecutive block indices (every layer) at a time, appended to one scratch file, and read back one block
at a time with a positioned read (`os.preadv`, straight into a tensor: one system call, no map to open,
trim or keep a descriptor for). A small LRU of blocks read from disk keeps hot blocks in RAM; the operating
system's page cache keeps recently read file pages as well, outside the process's resident set. RAM use is
therefore bounded by ``budget`` + the hot cache, however long the stream. The file is scratch space (a
saved session carries its blocks in its own file): on POSIX systems its name is removed as soon as it is
opened, so the disk space goes back to the system when the descriptor closes, even if the process is
killed; elsewhere the file is removed when the store is closed or garbage-collected.

The memory cache keeps two stores: evicted K/V blocks, and the block keys of finished super-blocks.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections import OrderedDict
from pathlib import Path

import torch


class BlockStore:
    """K/V blocks of every layer: k [kv_heads, block, head_dim], v [kv_heads, block, v_head_dim], on the CPU.

    ``v_head_dim=0`` stores keys only."""

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
        self.segment_blocks = 256 if budget is None else max(1, min(256, budget // (4 * max(1, per_index))))
        self.ram: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.ram_bytes = 0
        self.spilled = 0   # block indices [0, spilled) live on disk
        self.count = [0] * layers  # blocks stored per layer
        self.hot: OrderedDict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.file: int | None = None  # descriptor of the spill file
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
        done = min(self.count, default=0)  # indices every layer has stored
        while self.ram_bytes > self.budget and self.spilled + self.segment_blocks <= done:
            self._write_segment(self.spilled // self.segment_blocks)

    def _open(self) -> int:
        if self.file is None:
            parent = None if self.directory is None else Path(self.directory)
            if parent is not None:
                parent.mkdir(parents=True, exist_ok=True)
            self.folder = Path(tempfile.mkdtemp(prefix="sinkstream-memory-", dir=parent))
            self.file = os.open(self.folder / "blocks.kv", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            if os.name == "posix":  # an open file without a name: nothing is left behind after a kill
                shutil.rmtree(self.folder, ignore_errors=True)
            self._finalizer = weakref.finalize(self, _remove, self.folder, self.file)
        return self.file

    def _offset(self, layer: int, index: int) -> int:
        # Segment s is one run of the file: for each layer, for each block of the segment, k then v bytes.
        seg, i = divmod(index, self.segment_blocks)
        return ((seg * self.layers + layer) * self.segment_blocks + i) * self.block_bytes

    def _write_segment(self, seg: int) -> None:
        first = seg * self.segment_blocks
        parts = []
        for layer in range(self.layers):
            for index in range(first, first + self.segment_blocks):
                k, v = self.ram.pop((layer, index))
                parts += [t.view(torch.uint8).numpy() for t in (k, v) if t.numel()]
                self.ram_bytes -= self.block_bytes
        fd, offset = self._open(), self._offset(0, first)
        for part in parts:  # pwrite may write less than asked: loop until each part is out
            view = memoryview(part).cast("B")
            while view.nbytes:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
        self.spilled = first + self.segment_blocks

    # --- reading ------------------------------------------------------------------------------------
    def get(self, layer: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block `index` of `layer` as CPU tensors (do not modify them)."""
        if index >= self.count[layer]:
            raise IndexError(f"layer {layer} has {self.count[layer]} blocks, asked for {index}")
        key = (layer, index)
        kv = self.ram.get(key)
        if kv is not None:
            return kv
        kv = self.hot.get(key)
        if kv is not None:
            self.hot.move_to_end(key)
            return kv
        kv = self._read(layer, index)
        self.hot[key] = kv
        while len(self.hot) > self.hot_blocks:
            self.hot.popitem(last=False)
        return kv

    def _read(self, layer: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        raw = torch.empty(self.block_bytes, dtype=torch.uint8)
        got = os.preadv(self.file, [raw.numpy()], self._offset(layer, index))
        if got != self.block_bytes:
            raise OSError(f"short read from {self.folder}: {got} of {self.block_bytes} bytes")
        k = raw[:self.k_bytes].view(self.dtype).view(self.k_shape)
        v = raw[self.k_bytes:].view(self.dtype).view(self.v_shape)
        return k, v

    # --- accounting ---------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of blocks held in RAM (the budgeted part plus the hot cache)."""
        return self.ram_bytes + len(self.hot) * self.block_bytes

    @property
    def disk_bytes(self) -> int:
        return self.spilled * self.layers * self.block_bytes

    def close(self) -> None:
        """Remove the scratch file (the store is unusable afterwards)."""
        if self._finalizer is not None:
            self._finalizer()


def _remove(folder: Path, fd: int) -> None:
    os.close(fd)
    shutil.rmtree(folder, ignore_errors=True)

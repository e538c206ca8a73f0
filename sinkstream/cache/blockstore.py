"""Where the retrieval memory keeps fixed-size blocks: CPU RAM up to a byte budget, then disk; and the
append-only *log* that holds a saved session's blocks.

Blocks are keyed by (layer, block index); block ``n`` of every layer covers the same stream tokens. Blocks
arrive in order and never change once stored. Block indices live in up to three places, oldest first:

* ``[0, logged)``, the log (a saved session's, see `write_log`): two files in the session's log folder,
  ``<name>.kv`` with every block at ``(index * layers + layer) * block_bytes`` (k bytes, then v bytes) and
  ``<name>.crc`` with each block's CRC-32 (4 bytes little-endian, same order). A save appends the blocks
  not in the log yet and fsyncs both files; the session file records what `write_log` returns: how many
  indices are committed and a SHA-256 over their CRCs. `open_log` checks the lengths and that SHA-256,
  reading only the CRC file (4 bytes per block, never the blocks), and every block read from the log is
  checked against its CRC: a damaged block raises ValueError instead of giving wrong K/V. Bytes past the
  committed length (a save killed before its session file was replaced) are ignored, then overwritten by
  the next append. A log has one writer: the store bound to it.
* ``[logged, spilled)``, the scratch file: blocks not in a log that RAM had no room for. While the RAM
  blocks exceed ``budget`` bytes the oldest are dropped, a *segment* of consecutive block indices (every
  layer) at a time; those not in the log yet are written to the scratch file first. On POSIX systems its
  name is removed as soon as it is opened, so its disk space goes back to the system when the descriptor
  closes, even if the process is killed; elsewhere it is removed when the store is closed or
  garbage-collected. It is emptied whenever its blocks have been appended to the log.
* ``[spilled, count)``, RAM (which may also hold blocks that are in the log).

Blocks on disk are read one at a time with a positioned read (`os.preadv`, straight into a tensor: one
system call, no map to open, trim or keep a descriptor for). A small LRU of blocks read from disk keeps hot
blocks in RAM; the operating system's page cache keeps recently read file pages as well, outside the
process's resident set. RAM use is therefore bounded by ``budget`` + the hot cache, however long the stream,
and opening a log reads no block into RAM.

The memory cache keeps two kinds of stores: evicted K/V blocks, and the block keys of finished super-blocks.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import struct
import tempfile
import weakref
import zlib
from collections import OrderedDict
from pathlib import Path

import torch


class _Log:
    """One store's log files, open for reading and appending (see the module docstring)."""

    def __init__(self, folder: Path, name: str, *, create: bool):
        self.path = folder / f"{name}.kv"
        flags = os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0)
        self.kv = os.open(self.path, flags, 0o600)  # private, as the session file is
        try:
            self.crc = os.open(folder / f"{name}.crc", flags, 0o600)
        except OSError:
            os.close(self.kv)
            raise
        self.count = 0               # committed block indices
        self.sha = hashlib.sha256()  # over their CRC bytes
        self._finalizer = weakref.finalize(self, _close, self.kv, self.crc)

    def state(self) -> dict:
        return {"count": self.count, "crc_sha256": self.sha.hexdigest()}

    def close(self) -> None:
        self._finalizer()


class BlockStore:
    """K/V blocks of every layer: k [kv_heads, block, head_dim], v [kv_heads, block, v_head_dim], on the CPU.

    ``v_head_dim=0`` stores keys only."""

    def __init__(self, layers: int, kv_heads: int, block_size: int, head_dim: int, v_head_dim: int, *,
                 dtype: torch.dtype, budget: int | None = None, directory: str | os.PathLike | None = None,
                 hot_blocks: int = 256, name: str = "blocks"):
        self.layers, self.name = layers, name  # name: of the store's files in a log folder
        self.k_shape = (kv_heads, block_size, head_dim)
        self.v_shape = (kv_heads, block_size, v_head_dim)
        self.dtype = dtype
        esize = torch.empty(0, dtype=dtype).element_size()
        self.k_bytes = kv_heads * block_size * head_dim * esize
        self.block_bytes = self.k_bytes + kv_heads * block_size * v_head_dim * esize  # one layer
        self.budget, self.directory, self.hot_blocks = budget, directory, hot_blocks
        # Segments small next to the budget, so RAM overshoots it by little when one is dropped.
        per_index = self.block_bytes * layers
        self.segment_blocks = 256 if budget is None else max(1, min(256, budget // (4 * max(1, per_index))))
        self.ram: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.ram_bytes = 0
        self.spilled = 0   # block indices [0, spilled) are not in RAM: in the log, then in the scratch file
        self.logged = 0    # block indices [0, logged) are in the log
        self.count = [0] * layers  # blocks stored per layer
        self.hot: OrderedDict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.log: _Log | None = None
        self.file: int | None = None  # descriptor of the scratch file
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
        """Drop the oldest whole segments from RAM while it holds more than the budget (call between passes);
        blocks not in the log yet are written to the scratch file first."""
        if self.budget is None:
            return
        done = min(self.count, default=0)  # indices every layer has stored
        while self.ram_bytes > self.budget and self.spilled + self.segment_blocks <= done:
            self._spill(self.spilled + self.segment_blocks)

    def _scratch(self) -> int:
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

    def _spill(self, end: int) -> None:
        """Drop block indices [spilled, end) from RAM; those not in the log go to the scratch file, where
        index i of layer l sits at ((i - logged) * layers + l) * block_bytes."""
        first = max(self.spilled, self.logged)
        if first < end:
            parts = [b for i in range(first, end) for layer in range(self.layers) for b in _raw(*self.ram[layer, i])]
            _pwrite_all(self._scratch(), parts, (first - self.logged) * self.layers * self.block_bytes)
        for i in range(self.spilled, end):
            for layer in range(self.layers):
                del self.ram[layer, i]
                self.ram_bytes -= self.block_bytes
        self.spilled = end

    # --- the log ------------------------------------------------------------------------------------
    def write_log(self, folder: str | os.PathLike | None = None, *, bind: bool = True) -> dict:
        """Make block indices [0, done) durable (written and fsync'd) in a log; return its state
        ``{"count", "crc_sha256"}`` for the session file. ``folder=None``: append to this store's log the
        blocks it lacks: O(new blocks). A folder: write a complete log there (this store's log copied, then
        the rest appended); with ``bind`` it becomes this store's log."""
        done = min(self.count, default=0)
        if folder is None:
            if self.log is None:
                raise ValueError(f"the {self.name} store has no log to append to")
            log = self.log
        else:
            log = _Log(Path(folder), self.name, create=True)
            if self.log is not None:  # its committed blocks, copied as bytes (in the kernel where it can)
                _copy(self.log.kv, log.kv, self.logged * self.layers * self.block_bytes)
                _copy(self.log.crc, log.crc, self.logged * self.layers * 4)
                log.sha, log.count = self.log.sha.copy(), self.logged
        try:
            self._append(log, done)
        except BaseException:
            if log is not self.log:
                log.close()
            raise
        state = log.state()
        if log is not self.log:
            if not bind:
                log.close()
                return state
            if self.log is not None:
                self.log.close()
            self.log = log
        self.logged = done
        if self.file is not None:  # every scratch block is in the log now
            os.ftruncate(self.file, 0)
        return state

    def _append(self, log: _Log, done: int) -> None:
        """Write block indices [log.count, done) after the committed ones, fsync, then count them committed."""
        start, per_index = log.count, self.layers * self.block_bytes
        crcs = []
        for i in range(start, done):  # all at or past `logged`: in RAM or in the scratch file
            parts = []
            for layer in range(self.layers):
                kv = self.ram.get((layer, i))
                raw = _raw(*(kv if kv is not None else self._read(layer, i)))
                crc = 0
                for b in raw:
                    crc = zlib.crc32(b, crc)
                crcs.append(crc)
                parts += raw
            _pwrite_all(log.kv, parts, i * per_index)
        new = struct.pack(f"<{len(crcs)}I", *crcs)
        _pwrite_all(log.crc, [new], start * self.layers * 4)
        os.ftruncate(log.kv, done * per_index)  # what a killed save left past the committed blocks goes
        os.ftruncate(log.crc, done * self.layers * 4)
        os.fsync(log.kv)
        os.fsync(log.crc)
        log.sha.update(new)
        log.count = done

    def open_log(self, folder: str | os.PathLike, state: dict) -> None:
        """Take the committed blocks of the log in `folder` (`state`: what `write_log` returned) as this empty
        store's first blocks, read from the log when asked for. Checks the files' lengths and the SHA-256 of
        the committed CRCs (reading the CRC file only); raises ValueError if they do not match."""
        if any(self.count) or self.log is not None:
            raise ValueError("open_log needs an empty store")
        n, per_index = int(state["count"]), self.layers * self.block_bytes
        log = _Log(Path(folder), self.name, create=False)
        try:
            if os.fstat(log.kv).st_size < n * per_index or os.fstat(log.crc).st_size < n * self.layers * 4:
                raise ValueError(f"block log {log.path} is damaged: shorter than its {n} committed blocks")
            offset, end = 0, n * self.layers * 4
            while offset < end:
                chunk = os.pread(log.crc, min(end - offset, 1 << 20), offset)
                if not chunk:
                    raise ValueError(f"block log {log.path} is damaged: its CRC file is short")
                log.sha.update(chunk)
                offset += len(chunk)
            if log.sha.hexdigest() != state["crc_sha256"]:
                raise ValueError(f"block log {log.path} is damaged (checksum mismatch)")
        except BaseException:
            log.close()
            raise
        log.count = n
        self.log, self.logged, self.spilled, self.count = log, n, n, [n] * self.layers

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
        """Block `index` of `layer` from the log (checked against its CRC) or the scratch file."""
        raw = torch.empty(self.block_bytes, dtype=torch.uint8)
        slot = index * self.layers + layer
        if index < self.logged:
            got = os.preadv(self.log.kv, [raw.numpy()], slot * self.block_bytes)
            crc = os.pread(self.log.crc, 4, slot * 4)
            if got != self.block_bytes or len(crc) != 4 or zlib.crc32(raw.numpy()) != int.from_bytes(crc, "little"):
                raise ValueError(f"block log {self.log.path} is damaged: block {index} of layer {layer} fails "
                                 f"its CRC-32")
        else:
            got = os.preadv(self.file, [raw.numpy()], (slot - self.logged * self.layers) * self.block_bytes)
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
        """Bytes of blocks in the log and the scratch file."""
        return max(self.logged, self.spilled) * self.layers * self.block_bytes

    def close(self) -> None:
        """Remove the scratch file and close the log, which stays (the store is unusable afterwards)."""
        if self._finalizer is not None:
            self._finalizer()
        if self.log is not None:
            self.log.close()


def _raw(k: torch.Tensor, v: torch.Tensor) -> list:
    """A block's bytes, k then v, as buffers (no copy)."""
    return [t.view(torch.uint8).numpy() for t in (k, v) if t.numel()]


def _pwrite_all(fd: int, parts: list, offset: int) -> None:
    """Write `parts` one after another from `offset` (pwrite may write less than asked: loop until all is out)."""
    for part in parts:
        view = memoryview(part).cast("B")
        while view.nbytes:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n


def _copy(src: int, dst: int, nbytes: int) -> None:
    """Copy the first `nbytes` of file `src` to the start of file `dst`."""
    offset = 0
    while offset < nbytes:
        n = min(nbytes - offset, 1 << 24)
        try:
            got = os.copy_file_range(src, dst, n, offset, offset)
        except (AttributeError, OSError):  # not on this system, or not between these two files
            data = os.pread(src, n, offset)
            _pwrite_all(dst, [data], offset)
            got = len(data)
        if not got:
            raise ValueError(f"a block log is shorter than its {nbytes} committed bytes")
        offset += got


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a folder's entries (files created, renamed or removed in it) durable, where the system allows."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _close(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _remove(folder: Path, fd: int) -> None:
    os.close(fd)
    shutil.rmtree(folder, ignore_errors=True)

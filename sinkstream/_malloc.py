"""glibc's allocator, tuned for a process that holds a model and streams for ever (no-ops elsewhere).

glibc raises its mmap threshold each time a large block is freed, so later blocks of that size come from
the heap, where freed space stays mapped between long-lived buffers: loading a model then peaked well
above what it holds (an 86 MiB GGUF: 149 MiB over the baseline, 106 MiB with the threshold fixed), and a
`loading` context pins the threshold at 128 KiB while a model loads (blocks above it are mapped and
unmapped on their own), then sets it to 32 MiB, the most glibc's own rule would reach: running passes
reuse their large temporaries from the heap again (mapping each anew cost prefill 40% here).
`release_freed_memory` returns free heap pages.
"""
from __future__ import annotations

import contextlib
import ctypes

M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
LOADING_THRESHOLD = 128 * 1024
RUNNING_THRESHOLD = 32 * 1024 * 1024


def _libc():
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except (OSError, TypeError):
        return None


_LIBC = _libc()


@contextlib.contextmanager
def loading():
    """While a model loads: blocks of 128 KiB and more are mapped on their own and unmapped when freed."""
    if _LIBC is not None:
        _LIBC.mallopt(M_MMAP_THRESHOLD, LOADING_THRESHOLD)
    try:
        yield
    finally:
        if _LIBC is not None:
            _LIBC.mallopt(M_MMAP_THRESHOLD, RUNNING_THRESHOLD)


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (between the tensors of a load)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)

"""Our CPU kernels: block-quantized matrix products (qmm.cpp; on AVX-512 VNNI CPUs qtile.cpp, with AMX int8
tiles where the CPU has them), an RMS norm and RoPE (norm.cpp) and decode attention (attn.cpp), compiled
for this machine on first use.

``make`` builds them (``python -m sinkstream.kernels``); otherwise the first quantized model builds them
(about 20 s) into ``$SINKSTREAM_KERNEL_CACHE`` (default ``~/.cache/sinkstream/kernels``, not moved by
``$SINKSTREAM_CACHE`` so that test runs with a scratch cache reuse it) under a key of the source, torch's
version, this CPU's instruction sets and the compiler flags chosen for them; later processes load the built
library. Where they cannot be built (no C++ compiler, no x86 AVX2) or ``SINKSTREAM_KERNELS=0``, `available()` is False and the quantized layers use
torch's own kernels (sinkstream.quant says which).
"""
from __future__ import annotations

import hashlib
import os
import sys
import warnings
from pathlib import Path

import torch

SOURCES = [Path(__file__).with_name(n) for n in ("qmm.cpp", "qtile.cpp", "norm.cpp", "attn.cpp")]
HEADERS = [Path(__file__).with_name("qtile.h")]
_state: dict[str, object] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def build_dir() -> Path:
    root = os.environ.get("SINKSTREAM_KERNEL_CACHE") or \
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sinkstream" / "kernels"
    key = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS) + torch.__version__.encode() + _cpu_flags().encode()
                         + " ".join(_flags_for_this_cpu()).encode()).hexdigest()
    return Path(root) / key[:16]


def _flags_for_this_cpu() -> list[str]:
    flags = _cpu_flags().split()
    if "avx2" not in flags or "fma" not in flags:
        return ["-O3", "-ffp-contract=off"]  # the portable loops in qmm.cpp
    # no fused multiply-adds but those written out: plain float formulas (RoPE, the norm) round as torch's do
    out = ["-O3", "-ffp-contract=off", "-mavx2", "-mfma", "-mf16c"]
    if "avx512_vnni" in flags and "avx512vl" in flags:
        out += ["-mavx512f", "-mavx512vl", "-mavx512vnni"] + (["-mavx512bw"] if "avx512bw" in flags else [])
        if "amx_tile" in flags and "amx_int8" in flags:
            out += ["-mamx-tile", "-mamx-int8"]
    elif "avx_vnni" in flags:
        out += ["-mavxvnni"]
    return out


def load(*, verbose: bool = False) -> bool:
    """Build (if needed) and load the kernels into ``torch.ops.sinkstream``; True when they are there."""
    if "ok" in _state:
        return bool(_state["ok"])
    ok = False
    if os.environ.get("SINKSTREAM_KERNELS", "1") != "0":
        try:
            from torch.utils import cpp_extension
            # torch runs `ninja` from PATH; pip puts it (a dependency) beside this interpreter, which a
            # `.venv/bin/python` run by make or an IDE does not have on PATH
            bindir = os.path.dirname(sys.executable)
            if bindir not in os.environ.get("PATH", "").split(os.pathsep):
                os.environ["PATH"] = os.pathsep.join([bindir, os.environ.get("PATH", "")])
            folder = build_dir()
            folder.mkdir(parents=True, exist_ok=True)
            if not (folder / "sinkstream_kernels.so").exists():  # a silent pause of ~20 s otherwise
                print(f"sinkstream: compiling CPU kernels for this machine (once) into {folder}", file=sys.stderr)
            cpp_extension.load(name="sinkstream_kernels", sources=[str(p) for p in SOURCES], build_directory=str(folder),
                               extra_cflags=_flags_for_this_cpu() + ["-fopenmp"], extra_ldflags=["-fopenmp"],
                               is_python_module=False, verbose=verbose)
            ok = all(hasattr(torch.ops.sinkstream, op)
                     for op in ("q4_mm", "f32_mm", "qmm_amx", "rms_norm", "rotary", "decode_attention", "decode_attention_many"))
        except Exception as e:  # noqa: BLE001 - no compiler, no headers: say so once, use torch's kernels
            warnings.warn(f"sinkstream: CPU kernels not built ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                          "quantized layers use torch's kernels", stacklevel=2)
    _state["ok"] = ok
    return ok


def available() -> bool:
    return load()


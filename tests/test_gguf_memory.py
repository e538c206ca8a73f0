"""A ~90 MB Q4_0 GGUF loads natively with a peak RSS of at most 1.5x the file above the process baseline."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf.constants import GGMLQuantizationType as T  # noqa: E402

HID, KV, FFN, LAYERS, VOCAB, HEADS = 1024, 256, 4096, 10, 4096, 16


def q4_0_blocks(rows: int, cols: int, rng) -> np.ndarray:
    """Random Q4_0 data [rows, cols / 32 * 18]: random codes, every block's fp16 scale 0.01."""
    raw = rng.integers(0, 256, (rows, cols // 32, 18), dtype=np.uint8)
    raw[..., :2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    return raw.reshape(rows, -1)


def write_gguf(path, *, layers: int = LAYERS, vocab: int = VOCAB) -> None:
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in dict(context_length=2048, embedding_length=HID, block_count=layers, feed_forward_length=FFN,
                           head_count=HEADS, head_count_kv=HEADS * KV // HID, layer_norm_rms_eps=1e-5,
                           rope_freq_base=10000.0, rope_dimension_count=HID // HEADS, vocab_size=vocab).items():
        getattr(w, f"add_{key}")(value)

    def q(name, rows, cols):
        w.add_tensor(name, q4_0_blocks(rows, cols, rng), raw_dtype=T.Q4_0)
    q("token_embd.weight", vocab, HID)
    q("output.weight", vocab, HID)
    w.add_tensor("output_norm.weight", np.ones(HID, np.float32))
    for i in range(layers):
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{norm}.weight", np.ones(HID, np.float32))
        for name, rows, cols in (("attn_q", HID, HID), ("attn_k", KV, HID), ("attn_v", KV, HID),
                                 ("attn_output", HID, HID), ("ffn_gate", FFN, HID), ("ffn_up", FFN, HID),
                                 ("ffn_down", HID, FFN)):
            q(f"blk.{i}.{name}.weight", rows, cols)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


MEASURE = r"""
import json, os, sys
import torch
from sinkstream.gguf import open_gguf
from sinkstream.loading import build_model

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

# one-time costs before the baseline: gguf's and the families' imports, nn.init on meta tensors (which
# imports torch._dynamo), our kernels
tiny = open_gguf(sys.argv[2])
build_model(tiny.config, tiny)
del tiny
base = rss()
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to now
    f.write("5")
gm = open_gguf(sys.argv[1])
model = build_model(gm.config, gm, dtype=torch.float32, device="cpu")
del gm
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
size = sum(t.nbytes for t in model.state_dict().values())
print(json.dumps({"peak": peak - base, "model": size, "quant": model.quant}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures peak RSS the Linux way")
def test_native_gguf_load_peaks_below_one_and_a_half_files(tmp_path):
    path, tiny = tmp_path / "q4_0.gguf", tmp_path / "tiny.gguf"
    write_gguf(path)
    write_gguf(tiny, layers=1, vocab=64)
    size = path.stat().st_size
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(tiny)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"file {size / 2**20:.0f} MiB, model {r['model'] / 2**20:.0f} MiB, peak over baseline {r['peak'] / 2**20:.0f} MiB")
    assert r["quant"] == "gguf"
    assert r["peak"] <= 1.5 * size

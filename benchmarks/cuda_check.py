"""One run that checks sinkstream's CUDA path and times it: correctness first, then speed.

    python benchmarks/cuda_check.py [--device cuda] [--gguf-dir DIR] [--speed-shape 1b] [--json OUT]

Checks (each prints one line, PASS or FAIL with the measured difference):
1. every model family (tests/test_models_families.py's tiny random configs) on the device in float32:
   logits against transformers on the CPU, and chunked prefill against token-by-token feeding through a
   sink cache that evicts (80 tokens through 4+12);
2. the tiny GGUFs in `--gguf-dir` (benchmarks/gguf_shapes.py writes them) loaded on the device with the
   default quantization: logits against the same file de-quantized on the CPU;
3. the public API on the device: a `Session` chat saved and loaded back gives the same next turn, and
   `generate_batch` of 4 prompts gives each prompt's greedy tokens alone (float32);
4. speed: a random-weight model of a real Llama shape in bfloat16, sink(4, 2044) filled by a 2,040-token
   prompt, then greedy decoding: ms/token of one stream and aggregate tokens/s of 8 batched streams.

TF32 is off for the float32 comparisons. Needs transformers (reference and tokenizers) and gguf.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

RESULTS: list[dict] = []


def report(name: str, ok: bool, **measured) -> None:
    RESULTS.append(dict(check=name, ok=bool(ok), **measured))
    detail = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in measured.items())
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)


def families(dev: torch.device) -> None:
    import test_models_families as fam
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from sinkstream.cache import CacheConfig
    from sinkstream.loading import build_model
    hf_logging.disable_progress_bar()
    for name, make in fam.CONFIGS.items():
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(make()).eval()
        with torch.no_grad():
            for p in hf.parameters():
                p.normal_(0, 0.15)
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            sd = {}
            for f in sorted(Path(d).glob("*.safetensors")):
                sd.update(load_file(str(f)))
            config = json.loads((Path(d) / "config.json").read_text())
        ours = build_model(config, sd, device=dev)
        ids = fam.ids_for(40)
        with torch.no_grad():
            ref = hf(ids).logits[0]
            got = ours(ids.to(dev))[0].float().cpu()
        diff = (got - ref).abs().max().item()
        ids = fam.ids_for(80, seed=2).to(dev)
        cfg = CacheConfig("sink", sinks=4, window=12, prefill_chunk=7)
        chunked = fam.stream(ours, ours.make_cache(cfg), ids, prefill=30)
        single = fam.stream(ours, ours.make_cache(cfg), ids, prefill=1)
        chunk_diff = (chunked - single).abs().max().item()
        report(f"family {name}", diff <= 1e-4 and chunk_diff <= 1e-4 and chunked.device.type == dev.type,
               vs_transformers=diff, chunked_vs_single=chunk_diff)


def ggufs(dev: torch.device, folder: Path) -> None:
    import sinkstream
    files = sorted(folder.glob("llama-tiny-*.gguf"))
    if not files:
        report("gguf files", False, missing=str(folder))
    for path in files:
        ref_model, tok = sinkstream.load(path, device="cpu", dtype="float32", quant="none")
        model, _ = sinkstream.load(path, device=str(dev), dtype="float32")
        ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. " * 3)])
        with torch.no_grad():
            ref = ref_model(ids)[0]
            got = model(ids.to(dev))[0].float().cpu()
        diff = ((got - ref).abs().max() / ref.abs().max()).item()
        bf16, _ = sinkstream.load(path, device=str(dev))  # the device's default dtype
        text = sinkstream.generate(bf16, tok, "Hello", max_tokens=8)
        # CUDA de-quantizes each layer's weights (float32 here); our CPU kernels quantize activations to int8
        report(f"gguf {path.name}", diff <= (1e-3 if dev.type == "cuda" else 2e-2) and model.device.type == dev.type,
               quant=str(model.quant), rel_diff=diff, default_dtype=str(bf16.dtype), bf16_text_chars=len(text))


def public_api(dev: torch.device, folder: Path) -> None:
    import sinkstream
    from sinkstream.cache import CacheConfig
    from sinkstream.sampling import SamplingConfig
    path = next(iter(sorted(folder.glob("llama-tiny-Q8_0.gguf"))), None)
    if path is None:
        return
    model, tok = sinkstream.load(path, device=str(dev), dtype="float32")
    cfg = CacheConfig("sink", sinks=4, window=60, prefill_chunk=16)
    greedy = SamplingConfig(temperature=0.0)
    s = sinkstream.Session(model, tok, cache_config=cfg, sampling=greedy, system="Be brief.")
    for msg in ("Tell me about the sea.", "And the sky?"):
        "".join(r.text for r in s.chat(msg, max_tokens=24))
    with tempfile.TemporaryDirectory() as d:
        s.save(Path(d) / "s.session")
        back = sinkstream.Session.load(Path(d) / "s.session", model, tok)
    a = "".join(r.text for r in s.chat("One more?", max_tokens=24))
    b = "".join(r.text for r in back.chat("One more?", max_tokens=24))
    report("session save/load on device", a == b and s.cache.seen == back.cache.seen, seen=s.cache.seen,
           reply_chars=len(a))
    prompts = [list(range(10 + i, 40 + 7 * i)) for i in range(4)]
    kw = dict(max_tokens=64, sampling=greedy, stop_ids=set(), cache_config=cfg)
    batched = sinkstream.generate_batch(model, tok, prompts, **kw)
    kw.pop("cache_config")
    alone = [sinkstream.generate(model, tok, p, cache=model.make_cache(cfg), **kw) for p in prompts]
    report("generate_batch == alone (64 greedy tokens, 4 prompts)", batched == alone,
           same=sum(x == y for x, y in zip(batched, alone)))


def llama_config(shape: str, vocab: int = 49152) -> dict:
    from gguf_shapes import SHAPES
    s = SHAPES[shape]
    return dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab, hidden_size=s["hidden"],
                intermediate_size=s["ffn"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                num_key_value_heads=s["kv_heads"], rope_theta=s["rope_base"], rms_norm_eps=1e-5,
                max_position_embeddings=4096, tie_word_embeddings=s["tied"], hidden_act="silu")


def speed(dev: torch.device, shape: str, streams: int, folder: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    import sinkstream
    from sinkstream.cache import CacheConfig
    from sinkstream.loading import build_model
    from sinkstream.sampling import SamplingConfig
    config = llama_config(shape)
    with torch.device("meta"):
        names = {n: p.shape for n, p in AutoModelForCausalLM.from_config(
            AutoConfig.for_model(**config)).state_dict().items()}
    g = torch.Generator(device=dev).manual_seed(0)
    sd = {n: (torch.ones(s) if n.endswith("norm.weight") else
              torch.randn(s, generator=g, device=dev, dtype=torch.bfloat16) * 0.02) for n, s in names.items()}
    model = build_model(config, sd, dtype=torch.bfloat16, device=dev)
    tok = sinkstream.loading.tokenizer_for(folder / "llama-tiny-Q8_0.gguf")  # SmolLM2's 49152 tokens
    del sd
    cfg = CacheConfig("sink", sinks=4, window=2044, prefill_chunk=512)
    greedy = SamplingConfig(temperature=0.0)
    prompt = torch.randint(3, 49152, (2040,), generator=torch.Generator().manual_seed(1)).tolist()
    steps = 128

    def one():
        cache = model.make_cache(cfg)
        torch.cuda.synchronize(dev) if dev.type == "cuda" else None
        t0 = time.perf_counter()
        rs = list(sinkstream.stream_generate(model, tok, prompt, cache=cache, max_tokens=steps, sampling=greedy,
                                             stop_ids=set()))
        t = time.perf_counter() - t0
        return rs[-1], t

    one()  # warm-up
    runs = [one() for _ in range(3)]
    ms = sorted(1000 / r.generation_tps for r, _ in runs)[1]
    prefill = sorted(r.prompt_tps for r, _ in runs)[1]
    report(f"speed {shape} bf16 1 stream", True, decode_ms_per_token=ms, prefill_tok_s=prefill,
           cache_full=runs[0][0].cache_cached)

    prompts = [prompt[i:] + prompt[:i] for i in range(streams)]
    for _ in range(2):
        t0 = time.perf_counter()
        outs = sinkstream.generate_batch(model, tok, prompts, max_batch=streams, max_tokens=steps, sampling=greedy,
                                         stop_ids=set(), cache_config=cfg)
        wall = time.perf_counter() - t0
    report(f"speed {shape} bf16 {streams} streams batched", len(outs) == streams, wall_s=wall,
           tokens=streams * steps, aggregate_tok_s_incl_prefill=streams * steps / wall)
    if dev.type == "cuda":
        report("cuda peak memory", True, peak_gib=torch.cuda.max_memory_allocated(dev) / 2**30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--gguf-dir", type=Path, default=Path("/tmp/sinkstream-gguf"))
    ap.add_argument("--speed-shape", default="1b", help="a benchmarks/gguf_shapes.py shape, or 'none'")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"torch {torch.__version__}, device {dev}"
          + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""), flush=True)
    for part in (lambda: families(dev), lambda: ggufs(dev, args.gguf_dir), lambda: public_api(dev, args.gguf_dir),
                 lambda: None if args.speed_shape == "none" else speed(dev, args.speed_shape, args.streams, args.gguf_dir)):
        try:
            part()
        except Exception as e:  # noqa: BLE001 - one broken part must not hide the others' results
            import traceback
            traceback.print_exc()
            report("part raised", False, error=f"{type(e).__name__}: {e}"[:300])
    if args.json:
        args.json.write_text(json.dumps(RESULTS, indent=1))
    failed = [r["check"] for r in RESULTS if not r["ok"]]
    print(f"{len(RESULTS) - len(failed)} passed, {len(failed)} failed" + (f": {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

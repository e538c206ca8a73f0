"""sinkstream against llama.cpp on the same GGUF files, on the CPU: load time, prefill, decode, peak RSS.

    .venv/bin/python benchmarks/vs_llamacpp.py --make 1b:Q4_0 --make 8b:Q4_K_M --run      # make, then run them
    .venv/bin/python benchmarks/vs_llamacpp.py --run model.gguf --rounds 5 --json out.json
    .venv/bin/python benchmarks/vs_llamacpp.py --run m.gguf --sinkstream-env SINKSTREAM_KERNELS=0  # A/B

``--make SHAPE:TYPE`` (SHAPE tiny/1b/3b/8b, TYPE Q4_0/Q4_K_M/Q8_0, repeatable) writes random-weight GGUFs of
real Llama shapes into ``--dir`` and quantizes them with llama.cpp's own quantizer (see gguf_shapes.py);
files that exist are reused. ``--run [FILE ...]`` benchmarks the files named and those made by ``--make``.

For each file, after one plain sequential read of it (its time is printed as "read (page cache)": without
root the page cache cannot be dropped, so this is a warm read whenever the file was read recently), the two
engines run alternately, llama.cpp then sinkstream, ``--rounds`` times, each run in a fresh process of its
own venv (two engines in one process would fight over threads). A run loads the file, prefills
``--context`` token ids (random ordinary tokens from ``--seed``, the same ids for both), decodes 2 warm-up
tokens, then times ``--steps`` single-token decode steps (the next ids of the same list, so both engines do
the same work; each step produces last-token logits). It reports load seconds, prefill tokens/s, the median
decode ms/token and its peak RSS (``ru_maxrss``; it counts the file pages mapped and touched as well as
anonymous memory). Settings: llama.cpp ``n_ctx = context + 64`` (more if the steps need it), ``n_batch =
512``, ``n_threads = n_threads_batch = --threads``, llama-cpp-python defaults otherwise (mmap on, flash
attention off, f16 KV cache); sinkstream ``sink(4, context - 4)``, so its cache is full after the prefill
and every timed step evicts a token, in ``--dtype`` (float32) with ``--quant`` (auto: the file's own
quantization), its KV in ``--kv-dtype`` (default the model's dtype; bfloat16 matches llama.cpp's f16 cache
byte for byte). Both get ``OMP_NUM_THREADS = --threads``. Those runs find the file's tokenizer folder
built (after the first); ``--first-load`` also times sinkstream's load alone with nothing cached, --rounds
times (the tokenizer conversion included), as "first load s".

The table shows medians over the rounds and sinkstream / llama.cpp ratios, the file size and the load
average before and after the file's runs, with a warning when other work competed for the cores: both
engines' thread pools spin-wait at every barrier, so one descheduled thread stalls the others and ms/token
grows by orders of magnitude (run it on an otherwise idle machine). "RSS before load" is the RSS once the
engine is imported: its fixed cost, whatever the model. ``--json`` keeps every raw row.

The llama.cpp venv (``--llama-python``, default $SINKSTREAM_LLAMA_PYTHON or /work/llama-venv/bin/python) is
llama-cpp-python built from source without AMX (ggml's AMX code faults with a general-protection error in
some VMs):

    python3 -m venv /work/llama-venv
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \\
      -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON \\
      -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \\
      /work/llama-venv/bin/pip install --no-cache-dir --no-binary llama-cpp-python \
      llama-cpp-python==0.3.36 gguf numpy

Only the standard library is imported at module level: this file is also the worker run by both venvs
(``--worker llama|sinkstream``, a JSON spec on stdin, one JSON line on stdout).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

WARMUP = 2
REPO = Path(__file__).resolve().parents[1]
DEFAULT_LLAMA_PYTHON = os.environ.get("SINKSTREAM_LLAMA_PYTHON", "/work/llama-venv/bin/python")
DEFAULT_SINKSTREAM_PYTHON = str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists() \
    else sys.executable
ENGINES = ("llama.cpp", "sinkstream")
# (row key, label, decimals); ratio is sinkstream / llama.cpp for every metric.
METRICS = [("load_s", "load s", 2), ("prefill_tok_s", "prefill tok/s", 1), ("decode_ms", "decode ms/token", 2),
           ("peak_rss_mib", "peak RSS MiB", 0), ("rss_before_load_mib", "RSS before load", 0)]


# ---- workers (run in the engines' own venvs) ----

def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _rss_mib() -> float:
    """The current RSS: the runtime's own share (libraries, allocator) when read before the model loads."""
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")) / 1024


def _timed_steps(step, ids: list[int]) -> list[float]:
    """Seconds of `step(tok)` for each of ids[WARMUP:], after untimed calls on ids[:WARMUP]."""
    for tok in ids[:WARMUP]:
        step(tok)
    times = []
    for tok in ids[WARMUP:]:
        t = time.perf_counter()
        step(tok)
        times.append(time.perf_counter() - t)
    return times


def worker_llama(spec: dict) -> dict:
    t = time.perf_counter()
    import llama_cpp
    imported = time.perf_counter() - t
    rss0 = _rss_mib()
    ctx, ids = spec["context"], spec["ids"]
    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=spec["path"], n_ctx=ctx + max(64, len(ids) - ctx), n_batch=512,
                          n_threads=spec["threads"], n_threads_batch=spec["threads"], n_gpu_layers=0,
                          verbose=False)
    load = time.perf_counter() - t
    t = time.perf_counter()
    llm.eval(ids[:ctx])
    prefill = time.perf_counter() - t
    times = _timed_steps(lambda tok: llm.eval([tok]), ids[ctx:])
    return dict(import_s=imported, rss_before_load_mib=rss0, load_s=load, prefill_s=prefill, decode_s=times,
                version=llama_cpp.__version__, system_info=llama_cpp.llama_print_system_info().decode().strip())


def worker_sinkstream(spec: dict) -> dict:
    t = time.perf_counter()
    import torch

    import sinkstream
    imported = time.perf_counter() - t
    torch.set_num_threads(spec["threads"])
    rss0 = _rss_mib()
    ctx, ids = spec["context"], spec["ids"]
    t = time.perf_counter()
    model, _ = sinkstream.load(spec["path"], device="cpu", dtype=spec["dtype"], quant=spec["quant"], quiet=True)
    load = time.perf_counter() - t
    if spec.get("load_only"):
        return dict(import_s=imported, rss_before_load_mib=rss0, load_s=load)
    cache = model.make_cache(sinkstream.CacheConfig("sink", sinks=4, window=ctx - 4, kv_dtype=spec["kv_dtype"]))
    with torch.inference_mode():
        t = time.perf_counter()
        cache.run(model, torch.tensor([ids[:ctx]]))
        prefill = time.perf_counter() - t
        times = _timed_steps(lambda tok: cache.run(model, torch.tensor([[tok]])), ids[ctx:])
    return dict(import_s=imported, rss_before_load_mib=rss0, load_s=load, prefill_s=prefill, decode_s=times,
                version=sinkstream.__version__, torch=torch.__version__, torch_threads=torch.get_num_threads(),
                env={k: v for k, v in os.environ.items() if k.startswith("SINKSTREAM_")})


def worker_main(engine: str) -> None:
    spec = json.load(sys.stdin)
    row = (worker_llama if engine == "llama" else worker_sinkstream)(spec)
    row["peak_rss_mib"] = _peak_rss_mib()
    print(json.dumps(row), flush=True)


# ---- parent ----

def token_ids(path: str, n: int, seed: int) -> list[int]:
    """n ids drawn with `seed` from the file's ordinary tokens (token type 1; all ids when untyped)."""
    from gguf import GGUFReader
    fields = GGUFReader(path).fields
    vocab = len(fields["tokenizer.ggml.tokens"].data)
    types = fields.get("tokenizer.ggml.token_type")
    pool = [i for i, t in enumerate(types.contents()) if t == 1] if types is not None else list(range(vocab))
    return random.Random(seed).choices(pool, k=n)


def read_once(path: str) -> float:
    """Seconds to read the file once, sequentially, in 16 MiB blocks."""
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 24):
            pass
    return time.perf_counter() - t


def run_worker(engine: str, spec: dict, args) -> dict:
    """One run of `engine` in its own process; its result row (with "error" when it failed)."""
    python = args.llama_python if engine == "llama.cpp" else args.sinkstream_python
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if engine == "sinkstream":
        env.update(kv.split("=", 1) for kv in args.sinkstream_env)
    cmd = [python, str(Path(__file__).resolve()), "--worker", "llama" if engine == "llama.cpp" else "sinkstream"]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, input=json.dumps(spec), capture_output=True, text=True, env=env,
                           cwd=str(REPO), timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {args.timeout} s", wall_s=time.perf_counter() - t)
    wall = time.perf_counter() - t
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-15:])
        return dict(error=f"rc {p.returncode}: {tail}", wall_s=wall)
    row = json.loads(lines[-1])
    row["wall_s"] = wall
    if "prefill_s" in row:  # not a load-only run
        row["prefill_tok_s"] = spec["context"] / row["prefill_s"]
        row["decode_ms"] = statistics.median(row["decode_s"]) * 1e3
    return row


def _fmt(x, nd: int) -> str:
    return "-" if x is None else f"{x:,.{nd}f}"


def table(info: dict, rows: list[dict], args) -> str:
    """The per-file report: medians over rounds for both engines and sinkstream / llama.cpp."""
    la = lambda v: " ".join(f"{x:.2f}" for x in v)  # noqa: E731
    out = [f"== {info['path']}",
           f"   {info['size'] / 2**20:,.1f} MiB; context {args.context}, {args.steps} decode steps, "
           f"{args.threads} threads, {args.rounds} round(s); load average (1/5/15 min) "
           f"{la(info['loadavg_before'])} before, {la(info['loadavg_after'])} after"]
    med = {}
    for e in ENGINES:
        ok = [r for r in rows if r["engine"] == e and "error" not in r]
        med[e] = {k: statistics.median(r[k] for r in ok) if ok else None for k, _, _ in METRICS}
    w = 18
    out.append(f"   {'':<{w}}{'llama.cpp':>12}{'sinkstream':>12}{'ratio':>8}   (ratio = sinkstream / llama.cpp)")
    for key, label, nd in METRICS:
        a, b = med["llama.cpp"][key], med["sinkstream"][key]
        ratio = f"{b / a:.2f}" if a and b is not None else "-"
        out.append(f"   {label:<{w}}{_fmt(a, nd):>12}{_fmt(b, nd):>12}{ratio:>8}")
    out.append(f"   {'read (page cache)':<{w}}{'':>12}{_fmt(info['read_s'], 2):>12}"
               f"   s ({info['size'] / 2**30 / info['read_s']:.2f} GiB/s), beside sinkstream's load s")
    if info.get("first_load_s"):
        out.append(f"   {'first load s':<{w}}{'':>12}{_fmt(statistics.median(info['first_load_s']), 2):>12}"
                   "   sinkstream with nothing cached (median; its tokenizer folder built)")
    cores = len(os.sched_getaffinity(0))
    before, after = info["loadavg_before"][0], info["loadavg_after"][0]
    if before > cores - args.threads + 0.5 or after > cores + 0.5:
        out.append(f"   WARNING: load average {before:.2f} -> {after:.2f}, {cores} cores, {args.threads} "
                   "threads a run: other work shared the cores, which slows spin-waiting thread pools "
                   "(ggml's, OpenMP's) by orders of magnitude")
    for r in rows:
        if "error" in r:
            out.append(f"   {r['engine']} round {r['round'] + 1} FAILED: " + r["error"].replace("\n", "\n      "))
    return "\n".join(out)


def first_loads(path: str, spec: dict, args) -> list[float]:
    """sinkstream's load time of `path` with nothing of the file cached (its tokenizer folder is built
    through transformers' GGUF conversion, as on a file's first load), --rounds times: each run gets an
    empty cache folder holding only a link to the compiled kernels (sinkstream.loading.cache_root)."""
    import shutil
    import tempfile
    root = Path(os.environ.get("SINKSTREAM_CACHE") or
                Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sinkstream")
    out = []
    for _ in range(args.rounds):
        tmp = Path(tempfile.mkdtemp(prefix="sinkstream-first-load-"))
        try:
            if (root / "kernels").exists():
                (tmp / "kernels").symlink_to(root / "kernels")
            env_args = argparse.Namespace(**{**vars(args), "sinkstream_env": [*args.sinkstream_env,
                                                                            f"SINKSTREAM_CACHE={tmp}"]})
            row = run_worker("sinkstream", dict(spec, load_only=True), env_args)
            out.append(row["load_s"] if "error" not in row else float("nan"))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def bench_file(path: str, args, log) -> tuple[dict, list[dict]]:
    """Alternate the engines on `path`; (file info, rows)."""
    ids = token_ids(path, args.context + WARMUP + args.steps, args.seed)
    spec = dict(path=path, context=args.context, threads=args.threads, ids=ids, dtype=args.dtype, quant=args.quant,
                kv_dtype=args.kv_dtype)
    info = dict(path=path, size=os.path.getsize(path), read_s=read_once(path), loadavg_before=os.getloadavg())
    rows = []
    for rnd in range(args.rounds):
        for engine in ENGINES:
            row = dict(file=path, engine=engine, round=rnd, **run_worker(engine, spec, args))
            rows.append(row)
            if "error" in row:
                log(f"  round {rnd + 1} {engine}: FAILED ({row['error'].splitlines()[-1]})")
            else:
                log(f"  round {rnd + 1} {engine}: load {row['load_s']:.2f} s, prefill {row['prefill_tok_s']:.1f} "
                    f"tok/s, decode {row['decode_ms']:.2f} ms/token, peak RSS {row['peak_rss_mib']:.0f} MiB")
    if args.first_load:
        info["first_load_s"] = first_loads(path, spec, args)
        log(f"  sinkstream first loads (nothing cached): {', '.join(f'{v:.2f}' for v in info['first_load_s'])} s")
    info["loadavg_after"] = os.getloadavg()
    return info, rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--make", action="append", default=[], metavar="SHAPE:TYPE",
                   help="write a random-weight GGUF: SHAPE tiny/1b/3b/8b, TYPE Q4_0/Q4_K_M/Q8_0 (repeatable)")
    p.add_argument("--dir", default="/tmp/sinkstream-gguf", help="where --make writes (default %(default)s)")
    p.add_argument("--keep-f16", action="store_true", help="keep the F16 GGUFs --make writes before quantizing")
    p.add_argument("--run", nargs="*", metavar="FILE",
                   help="benchmark these GGUFs and the ones --make names (bare --run: only those)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--context", type=int, default=2048, help="tokens prefilled before decoding (default 2048)")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps (default 32)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each engine per file (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the token ids")
    p.add_argument("--quant", default="auto", help="sinkstream.load(quant=...) (default auto)")
    p.add_argument("--dtype", default="float32", help="sinkstream.load(dtype=...) (default float32)")
    p.add_argument("--kv-dtype", default=None, help="sinkstream's CacheConfig.kv_dtype (default: the model's dtype); "
                   "bfloat16 holds as many bytes a key as llama.cpp's default f16 cache")
    p.add_argument("--sinkstream-env", action="append", default=[], metavar="KEY=VAL",
                   help="environment for the sinkstream runs only (repeatable)")
    p.add_argument("--llama-python", default=DEFAULT_LLAMA_PYTHON, help="python of the llama-cpp-python venv")
    p.add_argument("--sinkstream-python", default=DEFAULT_SINKSTREAM_PYTHON, help="python of sinkstream's venv")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before a run is abandoned")
    p.add_argument("--first-load", action="store_true",
                   help="also time sinkstream's load with nothing cached (tokenizer conversion included), "
                        "--rounds times")
    p.add_argument("--json", metavar="OUT", help="write every raw row here")
    p.add_argument("--worker", choices=["llama", "sinkstream"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    if not args.make and args.run is None:
        p.error("nothing to do: give --make and/or --run")
    if args.context < 8 or args.steps < 1 or args.rounds < 1 or args.threads < 1:
        p.error("--context must be >= 8 and --steps, --rounds, --threads >= 1")
    for kv in args.sinkstream_env:
        if "=" not in kv:
            p.error(f"--sinkstream-env {kv!r}: expected KEY=VAL")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    files = list(args.run or [])
    if args.make:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import gguf_shapes
        specs = []
        for m in args.make:
            shape, _, qtype = m.partition(":")
            if shape not in gguf_shapes.SHAPES or qtype not in gguf_shapes.QTYPES:
                sys.exit(f"--make {m}: expected SHAPE:TYPE, SHAPE in {', '.join(gguf_shapes.SHAPES)}, "
                         f"TYPE in {', '.join(gguf_shapes.QTYPES)}")
            specs.append((shape, qtype))
        made = gguf_shapes.make(specs, Path(args.dir), llama_python=args.llama_python, threads=args.threads,
                                keep_f16=args.keep_f16, log=log)
        if args.run is None:
            print("\n".join(map(str, made)))
            return
        files += [str(f) for f in made if str(f) not in files]
    reports, all_rows, infos = [], [], []
    for path in files:
        log(f"{path}:")
        info, rows = bench_file(path, args, log)
        infos.append(info)
        all_rows += rows
        reports.append(table(info, rows, args))
        print(reports[-1] + "\n", flush=True)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("worker", "json")}
        Path(args.json).write_text(json.dumps(dict(settings=settings, files=infos, rows=all_rows), indent=1))
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()

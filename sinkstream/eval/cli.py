"""CLI for the evaluation harness: `sinkstream eval {ppl,recall,chat}`, `sinkstream bench`, `sinkstream sinks`.

Parsing, printing and files only; the measurements live in the sibling modules.
"""
from __future__ import annotations

import argparse

from .. import cli_args as A
from ..errors import SinkstreamError
from . import common as C


def _common(p: argparse.ArgumentParser, *, cache: bool = True, compare: str | None = None) -> None:
    A.add_model_args(p)
    if cache:
        A.add_cache_args(p)
    if compare is not None:
        p.add_argument("--compare", default=compare,
                       help="comma-separated caches to run on the same input, e.g. sink,window,dense,recompute "
                            "or with sizes sink:4+252,window:256,recompute:256 (bare window/recompute get the "
                            f"sink cache's total size; default: {compare or 'just --cache'})")
    p.add_argument("--seed", type=A.seed, default=0, help="random seed (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--out", type=A.out_folder, default=None, metavar="DIR", help="write CSV and PNG files here")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def _configs(args):
    return C.parse_cache_specs(args.compare or args.cache, A.cache_config(args))


def _bar(args, unit: str = "tok"):
    return lambda desc: A.Progress(desc, min_total=1, disable=args.quiet, unit=unit)


def _load(args):
    import torch
    if args.seed is not None:
        torch.manual_seed(args.seed)
    return A.load_model(args)


# --- eval ppl -------------------------------------------------------------------------------------------
def _ppl(args) -> int:
    from . import plots
    from .ppl import MODES, evaluate
    modes = tuple(m.strip() for m in args.mode.split(","))
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SinkstreamError(f"unknown --mode {bad[0]!r} (choose from {', '.join(MODES)})")
    model, tok = _load(args)
    ids = C.read_tokens(tok, args.files, args.tokens)
    res = evaluate(model, ids, _configs(args), modes=modes, chunk=args.chunk, recompute_every=args.recompute_every,
                   every=args.every, progress_factory=_bar(args))
    res["files"] = [str(f) for f in C.read_text_files(args.files)]
    out = C.out_dir(args.out)
    if out is not None:
        C.write_csv(out / "ppl.csv", res["results"])
        C.write_csv(out / "ppl_curve.csv", res["curve"])
        if res["curve"]:
            plots.ppl_curves(out / "ppl_curve.png", res["curve"], title=f"{res['tokens']} tokens")
    cols = [("label", "cache", ""), ("mode", "mode", ""), ("ppl", "PPL", ".3f"), ("nll", "NLL", ".4f"),
            ("scored", "scored", "d"), ("seconds", "s", ".1f")]
    if any("ppl_recompute_positions" in r for r in res["results"]):
        cols.insert(4, ("ppl_recompute_positions", "PPL@recompute pos", ".3f"))
    lines = [f"{res['tokens']} tokens, chunk {res['chunk']}"] + C.table(res["results"], cols)
    C.emit(args, res, lines)
    return 0


# --- eval recall ----------------------------------------------------------------------------------------
def _recall(args) -> int:
    from . import plots, recall
    model, tok = _load(args)
    configs = _configs(args)
    res: dict = {}
    lines: list[str] = []
    out = C.out_dir(args.out)
    if args.task in ("passkey", "both"):
        rows = recall.passkey(model, tok, configs, lengths=_ints(args.lengths), depths=_floats(args.depths),
                              trials=args.trials, seed=args.seed, progress=_bar(args))
        res["passkey"] = rows
        lines += ["passkey (accuracy by context length and depth):"]
        lines += C.table(rows, [("label", "cache", ""), ("length", "length", "d"), ("depth", "depth", ".2f"),
                                ("distance", "tokens back", "d"), ("correct", "correct", "d"),
                                ("trials", "trials", "d"), ("accuracy", "acc", ".2f")])
        if out is not None:
            C.write_csv(out / "passkey.csv", rows)
            plots.recall_plot(out / "passkey.png", rows, x="distance", xlabel="tokens between pass key and question",
                              title="Pass key recall", window_marks=_marks(configs))
    if args.task in ("streameval", "both"):
        if args.lines_file:
            pool = recall.lines_from_file(args.lines_file)
        else:
            pool = recall.generated_lines(args.lines + 10, seed=args.seed)
        rows, queries = recall.streameval(model, tok, configs, pool, distances=_ints(args.distances),
                                          n_lines=args.lines, query_every=args.query_every,
                                          max_tokens=args.max_tokens, progress=_bar(args))
        res["streameval"] = rows
        lines += ["StreamEval (accuracy by lines back):"]
        lines += C.table(rows, [("label", "cache", ""), ("distance_lines", "lines back", "d"),
                                ("distance_tokens", "≈tokens back", "d"), ("correct", "correct", "d"),
                                ("queries", "queries", "d"), ("accuracy", "acc", ".2f")])
        if out is not None:
            C.write_csv(out / "streameval.csv", rows)
            C.write_csv(out / "streameval_queries.csv", queries)
            plots.recall_plot(out / "streameval.png", rows, x="distance_tokens",
                              xlabel="≈ tokens between the line and the question", title="StreamEval line recall",
                              window_marks=_marks(configs))
    C.emit(args, res, lines)
    return 0


def _marks(configs) -> list[int]:
    return sorted({c.sinks + c.window if c.policy == "sink" else c.window for c in configs if c.policy != "dense"})


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise SinkstreamError(f"expected comma-separated integers, got {s!r}") from None


def _floats(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise SinkstreamError(f"expected comma-separated numbers, got {s!r}") from None


def _counts(text: str) -> str:
    """argparse type: comma-separated integers, each at least 1 (kept as text, parsed by `_ints`)."""
    try:
        values = _ints(text)
    except SinkstreamError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers of at least 1, got {text!r}")
    return text


def _fractions(text: str) -> str:
    """argparse type: comma-separated numbers in [0, 1]."""
    try:
        values = _floats(text)
    except SinkstreamError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not values or not all(0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers between 0 and 1, got {text!r}")
    return text


# --- eval chat ------------------------------------------------------------------------------------------
def _chat(args) -> int:
    from . import chat, plots
    questions = chat.read_questions(args.questions, limit=args.limit)
    model, tok = _load(args)
    summary, turns = chat.evaluate(model, tok, _configs(args), questions, max_tokens=args.max_tokens,
                                   sampling=A.sampling_config(args), system=args.system, progress=_bar(args, "turn"))
    res = {"turns": sum(len(q) for q in questions), "questions": len(questions), "max_tokens": args.max_tokens,
           "results": summary}
    if args.json_turns:
        res["per_turn"] = turns
    out = C.out_dir(args.out)
    if out is not None:
        C.write_csv(out / "chat_summary.csv", summary)
        C.write_csv(out / "chat_turns.csv", turns)
        plots.chat_plot(out / "chat_turns.png", turns)
    lines = [f"{res['turns']} user turns in one session per cache, replies up to {args.max_tokens} tokens"]
    lines += C.table(summary, [("label", "cache", ""), ("turns_done", "turns", "d"), ("overflow_at", "overflow@", ""),
                               ("degenerate", "degenerate", "d"), ("short", "<3 words", "d"), ("loops", "loops", "d"),
                               ("mean_reply_tokens", "reply tok", ".1f"), ("mean_latency_s", "latency s", ".2f"),
                               ("final_cached", "cached", "d"), ("tokens_seen", "seen", "d")])
    C.emit(args, res, lines)
    return 0


# --- bench ----------------------------------------------------------------------------------------------
def _bench(args) -> int:
    from . import bench, plots
    model, tok = _load(args)
    rows = bench.run(model, _configs(args), tokens=args.tokens, points=_ints(args.points) if args.points else None,
                     decode_steps=args.decode_steps, chunk=args.prefill_chunk, seed=args.seed, progress=_bar(args))
    peers = []
    if args.peers:
        peers = bench.peer_rows(args.model, positions=[r["position"] for r in rows if r["cache"] != "recompute"],
                                max_position=args.peer_max, decode_steps=args.decode_steps, progress=_bar(args))
    all_rows = rows + peers
    res = {"tokens": args.tokens, "rows": all_rows, "summary": bench.summarize(all_rows)}
    out = C.out_dir(args.out)
    if out is not None:
        C.write_csv(out / "bench.csv", all_rows)
        plots.bench_plot(out / "bench.png", all_rows)
    lines = C.table(all_rows, [("label", "cache", ""), ("position", "position", "d"), ("ms_per_token", "ms/token", ".2f"),
                               ("rss_mib", "RSS MiB", ".0f"), ("cache_mib", "cache MiB", ".1f"),
                               ("prefill_tps", "prefill tok/s", ".0f"), ("note", "note", "")])
    lines += [f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}" for k, v in res["summary"].items()]
    C.emit(args, res, lines)
    return 0


# --- sinks ----------------------------------------------------------------------------------------------
def _sinks(args) -> int:
    from . import plots, sinks
    model, tok = _load(args)
    ids = C.read_tokens(tok, args.files, args.tokens * args.samples)
    res = sinks.analyze(model, ids, tokens=args.tokens, samples=args.samples, first_k=args.first_k,
                        epsilon=args.epsilon)
    out = C.out_dir(args.out)
    if out is not None:
        C.write_csv(out / "sinks.csv", sinks.rows(res))
        plots.sink_heatmap(out / "sinks_heatmap.png", sinks.mass_matrix(res),
                           title=f"first-token attention mass ({res['tokens']} tok × {res['samples']}); "
                                 f"sink ratio {res['sink_ratio']:.0%} at ε={res['epsilon']}",
                           epsilon=res["epsilon"])
    lines = [f"sink ratio (heads with first-token mass > {res['epsilon']}): {res['sink_ratio']:.3f} "
             f"({res['sink_heads']}/{res['heads_total']} heads); mean first-token mass {res['mean_first_mass']:.3f}, "
             f"first {res['first_k']} tokens {res['mean_first_k_mass']:.3f}"]
    lines += C.table(res["layers"], [("layer", "layer", "d"), ("mean_first_mass", "mean first", ".3f"),
                                     ("max_first_mass", "max head", ".3f"),
                                     ("mean_first_k_mass", f"mean first-{res['first_k']}", ".3f"),
                                     ("sink_heads", f"heads>{res['epsilon']}", "d")])
    C.emit(args, res, lines)
    return 0


def register(sub) -> None:
    ev = sub.add_parser("eval", help="evaluation harness: perplexity, recall, multi-round chat")
    evsub = ev.add_subparsers(dest="eval_command", required=True)

    p = evsub.add_parser("ppl", help="perplexity of a long stream under one or several cache policies")
    p.add_argument("files", nargs="*", help="text files, concatenated in order (default: the bundled excerpt)")
    p.add_argument("--tokens", type=A.positive_int, default=None, help="use only the first N tokens")
    p.add_argument("--mode", default="banded",
                   help="comma-separated: exact (token by token, the paper's protocol), banded (chunks with "
                        "per-query masks = exact, fast; default), chunked (chunk sees the whole pre-chunk cache, "
                        "approximate)")
    p.add_argument("--chunk", type=A.positive_int, default=512, help="tokens per pass in banded/chunked modes")
    p.add_argument("--every", type=A.positive_int, default=1000, help="running-curve block size in tokens")
    p.add_argument("--recompute-every", type=A.positive_int, default=16,
                   help="score recompute on every k-th token only")
    _common(p, compare="")
    p.set_defaults(func=_ppl)

    r = evsub.add_parser("recall", help="what the window keeps and forgets: pass key and StreamEval")
    r.add_argument("--task", choices=("passkey", "streameval", "both"), default="both")
    r.add_argument("--lengths", type=_counts, default="512,1024,2048", help="passkey: context lengths in tokens")
    r.add_argument("--depths", type=_fractions, default="0.1,0.5,0.9",
                   help="passkey: where the key sits (0 = start, 1 = end)")
    r.add_argument("--trials", type=A.positive_int, default=2, help="passkey: random keys per length and depth")
    r.add_argument("--distances", type=_counts, default="10,20,40,80",
                   help="StreamEval: lines between a line and its question")
    r.add_argument("--lines", type=A.positive_int, default=100, help="StreamEval: lines streamed per distance")
    r.add_argument("--query-every", type=A.positive_int, default=10, help="StreamEval: ask after every N lines")
    r.add_argument("--lines-file", default=None,
                   help="StreamEval: take lines from a LongEval jsonl (default: generated from --seed)")
    r.add_argument("--max-tokens", type=A.positive_int, default=40, help="StreamEval: reply tokens per question")
    _common(r, compare="")
    r.set_defaults(func=_recall)

    c = evsub.add_parser("chat", help="MT-Bench-style: many user turns in one endless session per cache")
    c.add_argument("--questions", default=None, help="JSONL with a `turns` list per line (default: a bundled sample)")
    c.add_argument("--limit", type=A.positive_int, default=None, help="use the first N questions")
    c.add_argument("--max-tokens", type=A.positive_int, default=128, help="reply tokens per turn")
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--json-turns", action="store_true", help="include every turn in the JSON output")
    A.add_sampling_args(c)
    A.add_model_args(c)
    A.add_cache_args(c)
    c.add_argument("--compare", default="", help="caches to compare, as for eval ppl (default: just --cache)")
    c.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    c.add_argument("--out", type=A.out_folder, default=None, metavar="DIR", help="write CSV and PNG files here")
    c.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    c.set_defaults(func=_chat)

    b = sub.add_parser("bench", help="decode latency and memory against stream position, per cache policy")
    b.add_argument("--tokens", type=A.positive_int, default=100_000,
                   help="furthest stream position (default 100K; 1M works)")
    b.add_argument("--points", type=_counts, default=None,
                   help="comma-separated positions (default: 1-3-10 steps up to --tokens)")
    b.add_argument("--decode-steps", type=A.positive_int, default=16, help="timed decode steps at each position")
    b.add_argument("--peers", action="store_true",
                   help="add HF transformers dense decoding (and llama-cpp-python if installed) as peer rows")
    b.add_argument("--peer-max", type=A.positive_int, default=8192, help="furthest position for the dense peers")
    _common(b, compare="sink,dense,recompute")
    b.set_defaults(func=_bench)

    s = sub.add_parser("sinks", help="attention-sink analysis: attention mass on the first token per layer/head")
    s.add_argument("files", nargs="*", help="text files (default: the bundled excerpt)")
    s.add_argument("--tokens", type=A.positive_int, default=512, help="tokens per sample")
    s.add_argument("--samples", type=A.positive_int, default=2, help="consecutive samples averaged")
    s.add_argument("--first-k", type=A.positive_int, default=4, help="also report mass on the first k tokens")
    s.add_argument("--epsilon", type=A.fraction, default=0.3, help="a head is a sink head above this mass")
    _common(s, cache=False)
    s.set_defaults(func=_sinks)

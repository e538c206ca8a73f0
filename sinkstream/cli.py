"""`sinkstream` command line: argument parsing and dispatch only.

Core subcommands live here (generate, chat, models); other packages add theirs by exposing
`register(subparsers)` in one of PLUGINS (eval harness, server), imported only when present.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time

from . import cli_args as A
from .errors import SinkstreamError

PLUGINS = ("sinkstream.eval.cli", "sinkstream.server.cli")


def _generate(args) -> int:
    from .generate import stream_generate
    model, tok = A.load_model(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if args.chat_template:
        from .tokenizer import render_chat
        prompt = render_chat(tok, [{"role": "user", "content": prompt}])
    cache = model.make_cache(A.cache_config(args))
    progress = A.Progress("prefill")
    last = None
    for r in stream_generate(model, tok, prompt, cache=cache, max_tokens=args.max_tokens,
                             sampling=A.sampling_config(args), stop=args.stop, progress=progress):
        sys.stdout.write(r.text)
        sys.stdout.flush()
        last = r
    sys.stdout.write("\n")
    if last is not None and args.verbose:
        print(f"[prompt {last.prompt_tokens} tok, {last.prompt_tps:.1f} tok/s | generated {last.generation_tokens} "
              f"tok, {last.generation_tps:.1f} tok/s | cache {last.cache_cached}/{cache.capacity}]", file=sys.stderr)
    return 0


def _chat(args) -> int:
    if args.server:
        from urllib.parse import urlsplit

        from .chat_client import chat_remote
        url = urlsplit(args.server)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise SinkstreamError(f"--server needs an http:// or https:// URL, got {args.server!r}")
        return chat_remote(args)
    from .repl import HELP, run_repl, stats_line
    from .session import Session
    model, tok = A.load_model(args)
    s = Session(model, tok, A.cache_config(args), A.sampling_config(args), system=args.system,
                pin_system=args.pin_system)
    pinned = f", system prompt pinned ({s.pinned} tokens)" if s.pinned else ""
    print(f"sinkstream chat: {A.cache_config(args).describe()} cache{pinned}. {HELP}", file=sys.stderr)

    def reply(line: str) -> None:
        t0, last = time.perf_counter(), None
        for r in s.chat(line, max_tokens=args.max_tokens, progress=A.Progress("prefill")):
            sys.stdout.write(r.text)
            sys.stdout.flush()
            last = r
        sys.stdout.write("\n")
        if last is not None:
            print(f"[{last.generation_tokens} tok, {last.generation_tps:.1f} tok/s, "
                  f"{time.perf_counter() - t0:.1f}s | cache {s.cache.cached}/{s.cache.capacity}]", file=sys.stderr)

    def reset() -> str:
        s.reset()
        return "[session reset]"

    def stats() -> str:
        st = s.stats()
        return stats_line(st.turns, st.tokens_seen, st.tokens_cached, st.capacity, st.cache_bytes)

    return run_repl(reply=reply, reset=reset, stats=stats)


def _models(args) -> int:
    from .loading import SHORT_NAMES
    from .models import families
    print("Supported families (by config model_type):")
    for fam, (types, needs) in families().items():
        print(f"  {fam:10s} model_type: {types}\n  {'':10s} {needs}")
    print("Short names: " + ", ".join(SHORT_NAMES))
    return 0


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line like every other user error (subcommands inherit it)."""

    def error(self, message: str):
        self.exit(2, f"sinkstream: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="sinkstream", description="Endless streaming LLM inference with attention sinks")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete a prompt (stdout), endless with --max-tokens -1")
    g.add_argument("prompt", nargs="?", help="prompt text (default: stdin)")
    g.add_argument("--max-tokens", type=A.max_tokens, default=256, help="-1 = endless")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--chat-template", action="store_true", help="wrap the prompt as one user chat turn")
    g.add_argument("--verbose", "-v", action="store_true", help="print speed and cache stats to stderr")
    A.add_model_args(g); A.add_cache_args(g); A.add_sampling_args(g)
    g.set_defaults(func=_generate)

    c = sub.add_parser("chat", help="interactive multi-round chat in one endless session")
    c.add_argument("--max-tokens", type=A.max_tokens, default=512, help="reply tokens per turn, -1 = endless")
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--pin-system", action="store_true",
                   help="keep the system prompt for ever: its tokens become the cache's sinks, never evicted")
    c.add_argument("--server", default=None, help="talk to a running `sinkstream serve` at this URL")
    c.add_argument("--session", default=None, help="server session id (with --server)")
    c.add_argument("--api-key", default=None, help="server API key (with --server)")
    A.add_model_args(c); A.add_cache_args(c); A.add_sampling_args(c)
    c.set_defaults(func=_chat)

    m = sub.add_parser("models", help="list supported model families")
    m.set_defaults(func=_models)

    for name in PLUGINS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):  # that plugin is not part of this install
                continue
            raise
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except SinkstreamError as e:
        print(f"sinkstream: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:  # a file or folder the user named: missing, unwritable, a full disk
        print(f"sinkstream: error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

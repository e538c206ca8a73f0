"""The interactive loop shared by `sinkstream chat` (local) and `sinkstream chat --server` (remote)."""
from __future__ import annotations

import sys
from collections.abc import Callable

HELP = "commands: /reset (start over), /stats, /exit"


def stats_line(turns: int, seen: int, cached: int, capacity, nbytes: int) -> str:
    return f"[turns {turns} | tokens seen {seen} | cached {cached}/{capacity} | cache {nbytes / 2**20:.1f} MiB]"


def run_repl(*, reply: Callable[[str], None], reset: Callable[[], str], stats: Callable[[], str]) -> int:
    """Read lines until /exit or EOF: commands go to `reset`/`stats` (which return a status line),
    anything else to `reply` (which streams the answer itself)."""
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit", "/bye"):
            return 0
        if cmd == "/reset":
            print(reset(), file=sys.stderr)
        elif cmd == "/stats":
            print(stats(), file=sys.stderr)
        elif cmd.startswith("/"):
            print(f"[unknown command {cmd}; {HELP}]", file=sys.stderr)
        else:
            reply(line)

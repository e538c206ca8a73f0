"""A long session against a real `sinkstream serve`: per-turn latency must not grow with the turn number.

Starts the server on a free loopback port, creates one session and runs --turns chat turns, each sent the
OpenAI way (the whole history, checked by the server against the session) unless --append. Prints
latency per block of turns, the ratio of the last 20 turns to the first 20, and the server's resident
memory. With --stateless it also runs the same conversation with no session (the history re-read every
turn, as other servers do) for contrast.

    python benchmarks/server_turns.py                      # tiny random model, 200 turns
    python benchmarks/server_turns.py --model smollm2 --turns 200 --max-tokens 16
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil


def tiny_model(folder: Path) -> Path:
    """A 2-layer Llama with random weights and SmolLM2's tokenizer: replies always run to max_tokens."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from sinkstream.loading import tokenizer_for
    tok = tokenizer_for(None)
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=4096, tie_word_embeddings=True, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(cfg.to_json_string())
    tok.save_pretrained(str(folder))
    return folder


def start_server(args, state_dir: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "sinkstream", "serve", "--port", "0", "--state-dir", state_dir,
           "--sinks", str(args.sinks), "--window", str(args.window), "--model-name", "bench"]
    if args.model_path:
        cmd += ["--model", args.model_path]
    if getattr(args, "quant", "none") != "none":
        cmd += ["--quant", args.quant]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    url = None
    for line in proc.stderr:
        m = re.search(r"serving \S+ on (http://\S+)", line)
        if m:
            url = m.group(1)
            break
    if url is None:
        raise SystemExit("server did not start")
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    for _ in range(600):
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit("server never became healthy")


def run(http: httpx.Client, turns: int, max_tokens: int, *, session: str | None, append: bool,
        proc: subprocess.Popen, label: str) -> list[float]:
    history: list[dict] = []
    latency, per_token = [], []
    rss = {}
    for t in range(1, turns + 1):
        msg = {"role": "user", "content": f"Turn {t}: tell me one more short fact about the sea, please."}
        history.append(msg)
        body = {"messages": [msg] if append else history, "max_tokens": max_tokens, "temperature": 0}
        if session:
            body.update(session=session, append=append)
        t0 = time.perf_counter()
        r = http.post("/v1/chat/completions", json=body)
        dt = time.perf_counter() - t0
        if r.status_code != 200:
            print(f"[{label}] turn {t}: HTTP {r.status_code} {r.text[:200]}")
            break
        out = r.json()
        history.append({"role": "assistant", "content": out["choices"][0]["message"]["content"]})
        latency.append(dt)
        per_token.append(dt / max(1, out["usage"]["completion_tokens"]))
        if t in (1, 20, turns // 2, turns):
            rss[t] = psutil.Process(proc.pid).memory_info().rss / 2**20
            extra = out.get("session") or {}
            print(f"[{label}] turn {t:4d}: {dt * 1000:7.1f} ms, prompt {out['usage']['prompt_tokens']:5d} tok, "
                  f"generated {out['usage']['completion_tokens']:3d}, cache {extra.get('tokens_cached', '-')}/"
                  f"{extra.get('cache_capacity', '-')}, seen {extra.get('tokens_seen', '-')}, "
                  f"server RSS {rss[t]:.0f} MiB", flush=True)
    n = min(20, len(latency) // 2)
    if n:
        first, last = statistics.mean(latency[:n]), statistics.mean(latency[-n:])
        f_tok, l_tok = statistics.mean(per_token[:n]), statistics.mean(per_token[-n:])
        med = statistics.median(latency[-n:]) / statistics.median(latency[:n])
        print(f"[{label}] {len(latency)} turns: first {n} mean {first * 1000:.1f} ms, last {n} mean "
              f"{last * 1000:.1f} ms, ratio last/first = {last / first:.3f} (of medians: {med:.3f}; per generated "
              f"token: {l_tok / f_tok:.3f}); median {statistics.median(latency) * 1000:.1f} ms; "
              f"RSS MiB by turn: {', '.join(f'{k}: {v:.0f}' for k, v in rss.items())}")
    return latency


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny' (random weights, built here) or what --model takes")
    p.add_argument("--turns", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=252)
    p.add_argument("--append", action="store_true", help="send only the new message (default: whole history)")
    p.add_argument("--stateless", type=int, default=0, metavar="N",
                   help="also run N turns with no session (history re-sent and re-read) for contrast")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        args.model_path = str(tiny_model(Path(tmp) / "tiny")) if args.model == "tiny" else args.model
        if args.model == "smollm2":
            args.model_path = None
        proc, url = start_server(args, str(Path(tmp) / "state"))
        print(f"server {url}, model {args.model}, cache sink({args.sinks},{args.window}), {args.turns} turns of "
              f"{args.max_tokens} tokens, {'append' if args.append else 'whole history'} per request, "
              f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
        try:
            with httpx.Client(base_url=url, timeout=600) as http:
                sid = http.post("/v1/sessions", json={"id": "bench"}).json()["id"]
                run(http, args.turns, args.max_tokens, session=sid, append=args.append, proc=proc, label="session")
                if args.stateless:
                    run(http, args.stateless, args.max_tokens, session=None, append=False, proc=proc,
                        label="stateless")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()

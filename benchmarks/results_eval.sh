#!/usr/bin/env bash
# Recall, chat, sinks and bench numbers for docs/RESULTS.md. Usage: benchmarks/results_eval.sh [DATA_DIR]
# About 10 minutes of one CPU core. CSV/PNG under out/results/, PNGs copied to docs/img/.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
SS=${SS:-.venv/bin/sinkstream}
OUT=out/results
mkdir -p "$OUT" docs/img
say() { echo "== $*"; }

say "sinkstream sinks \$DATA/pg1342_pride_and_prejudice.txt --tokens 1024 --samples 2"
"$SS" sinks "$DATA/pg1342_pride_and_prejudice.txt" --tokens 1024 --samples 2 --out "$OUT/sinks" -q | tee "$OUT/sinks.txt"
cp "$OUT/sinks/sinks_heatmap.png" docs/img/sinks_smollm2.png

say "sinkstream eval recall --task passkey --compare dense,sink:4+508,window:512 --lengths 1024,2048 --depths 0.1,0.5,0.9 --trials 2"
"$SS" eval recall --task passkey --compare dense,sink:4+508,window:512 --lengths 1024,2048 --depths 0.1,0.5,0.9 \
  --trials 2 --out "$OUT/passkey" -q | tee "$OUT/passkey.txt"
cp "$OUT/passkey/passkey.png" docs/img/recall_passkey.png

say "sinkstream eval recall --task streameval --lines-file \$DATA/longeval_lines_200.jsonl --compare dense,sink:4+508 --distances 10,20,40,80 --lines 100 --max-tokens 40"
"$SS" eval recall --task streameval --lines-file "$DATA/longeval_lines_200.jsonl" --compare dense,sink:4+508 \
  --distances 10,20,40,80 --lines 100 --max-tokens 40 --out "$OUT/streameval" -q | tee "$OUT/streameval.txt"
cp "$OUT/streameval/streameval.png" docs/img/recall_streameval.png

say "sinkstream eval chat --questions \$DATA/mt_bench.jsonl --limit 8 --max-tokens 48 --compare dense,sink:4+508,window:512"
"$SS" eval chat --questions "$DATA/mt_bench.jsonl" --limit 8 --max-tokens 48 --compare dense,sink:4+508,window:512 \
  --out "$OUT/chat" -q | tee "$OUT/chat.txt"
cp "$OUT/chat/chat_turns.png" docs/img/chat_turns.png

# all 80 questions x 2 turns (about 70 min on one core of this machine)
say "sinkstream eval chat --questions \$DATA/mt_bench.jsonl --max-tokens 128 --compare dense,sink:4+1020,window:1024"
"$SS" eval chat --questions "$DATA/mt_bench.jsonl" --max-tokens 128 --compare dense,sink:4+1020,window:1024 \
  --out "$OUT/chat_full" -q | tee "$OUT/chat_full.txt"
cp "$OUT/chat_full/chat_turns.png" docs/img/chat_full.png

say "sinkstream bench --tokens 30000 --compare sink:4+1020,dense,recompute:1024 --decode-steps 8 --peers"
"$SS" bench --tokens 30000 --compare sink:4+1020,dense,recompute:1024 --decode-steps 8 --peers \
  --out "$OUT/bench" -q 2>/dev/null | tee "$OUT/bench.txt"
cp "$OUT/bench/bench.png" docs/img/bench.png

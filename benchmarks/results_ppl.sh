#!/usr/bin/env bash
# Perplexity tables for docs/RESULTS.md (Table 1 / Table 2 analogues, cache-size sweep, feeding modes).
# Usage: benchmarks/results_ppl.sh [DATA_DIR]   (default ../shared/data). CSV/PNG under out/results/.
# Takes about 15 minutes of one CPU core with TOKENS=4000 (the docs run); TOKENS=16000 etc. for longer streams.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
TOKENS=${TOKENS:-4000}
SS=${SS:-.venv/bin/sinkstream}
BOOKS=$(ls "$DATA"/pg*.txt | sort)
OUT=out/results
mkdir -p "$OUT" docs/img
run() {
  local name=$1; shift
  echo "== $name: sinkstream eval ppl \$BOOKS $* --out $OUT/$name"
  "$SS" eval ppl $BOOKS "$@" --out "$OUT/$name" -q | tee "$OUT/$name.txt"
}

# Table 1: window(W) vs sink(4, W-4) vs recompute(W) vs dense, W = 256 and 1024.
run table1 --tokens "$TOKENS" --every 500 --recompute-every 64 \
  --compare dense,window:256,sink:4+252,recompute:256,window:1024,sink:4+1020,recompute:1024
# Table 2: 0, 1, 2, 4, 8 sinks at a fixed cache size of 256.
run table2 --tokens "$TOKENS" --every 500 --compare sink:0+256,sink:1+255,sink:2+254,sink:4+252,sink:8+248
# Cache-size sweep: window(N) vs sink(4, N-4), N = 128 ... 2048 (raise TOKENS before adding 4096).
run sweep --tokens "$TOKENS" --every 500 \
  --compare window:128,sink:4+124,window:256,sink:4+252,window:512,sink:4+508,window:1024,sink:4+1020,window:2048,sink:4+2044
# Feeding modes on a sample: exact (token by token) vs banded vs chunked, chunk 256.
run modes --tokens 1000 --every 250 --chunk 256 --mode exact,banded,chunked --compare window:256,sink:4+252
for f in table1 table2 sweep modes; do cp "$OUT/$f/ppl_curve.png" "docs/img/ppl_$f.png"; done

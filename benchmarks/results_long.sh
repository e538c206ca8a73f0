#!/usr/bin/env bash
# The long runs behind docs/RESULTS.md "PPL flat over a long stream" and "bench to 1M tokens".
# Usage: benchmarks/results_long.sh [DATA_DIR] ; TOKENS=1000000 by default (about 35 min per 1M-token pass
# at ~500 tok/s on an idle 2-core CPU; far less on a GPU). CSV/PNG under out/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
TOKENS=${TOKENS:-1000000}
SS=${SS:-.venv/bin/sinkstream}
OUT=out/results
BOOKS=$(ls "$DATA"/pg*.txt "$DATA"/kjv_bible_part*.txt | sort)   # ~3.3M tokens in this order
mkdir -p "$OUT" docs/img

echo "== sinkstream eval ppl \$BOOKS --tokens $TOKENS --compare sink:4+1020 --mode banded --chunk 1024 --every 10000"
"$SS" eval ppl $BOOKS --tokens "$TOKENS" --compare sink:4+1020 --mode banded --chunk 1024 --every 10000 \
  --out "$OUT/long_ppl" | tee "$OUT/long_ppl.txt"
cp "$OUT/long_ppl/ppl_curve.png" docs/img/ppl_long.png

echo "== sinkstream bench --tokens $TOKENS --compare sink:4+1020,recompute:1024 --decode-steps 16"
"$SS" bench --tokens "$TOKENS" --compare sink:4+1020,recompute:1024 --decode-steps 16 --out "$OUT/long_bench" \
  | tee "$OUT/long_bench.txt"
cp "$OUT/long_bench/bench.png" docs/img/bench_long.png

#!/usr/bin/env bash
# The long runs behind docs/RESULTS.md "PPL flat over a long stream" and "bench to 1M tokens".
# Usage: benchmarks/results_long.sh [DATA_DIR]
#   TOKENS (default 1000000), DTYPE (default bfloat16: on a CPU with AVX512-BF16 it prefills ~1.5x faster
#   than float32; on 8K tokens of Austen the two gave PPL 20.9016 vs 20.9002), THREADS (default 1, so the
#   two runs can go side by side on a 2-core machine). About 70 min per 1M-token pass per thread here.
# CSV/PNG under out/results/; the plots are copied to docs/img/.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
TOKENS=${TOKENS:-1000000}
DTYPE=${DTYPE:-bfloat16}
export OMP_NUM_THREADS=${THREADS:-1}
SS=${SS:-.venv/bin/sinkstream}
OUT=out/results
# the nine novels in file-name order, then the King James Bible: ~3.3M SmolLM2 tokens
BOOKS="$(ls "$DATA"/pg*.txt | sort | tr '\n' ' ') $DATA/kjv_bible_part1_genesis-esther.txt $DATA/kjv_bible_part2_job-malachi.txt"
mkdir -p "$OUT" docs/img

echo "== sinkstream eval ppl \$BOOKS --tokens $TOKENS --mode banded --chunk 256 --every 10000 --compare sink:4+1020 --dtype $DTYPE"
"$SS" eval ppl $BOOKS --tokens "$TOKENS" --mode banded --chunk 256 --every 10000 --compare sink:4+1020 \
  --dtype "$DTYPE" --out "$OUT/long_ppl" > "$OUT/long_ppl.txt" 2> "$OUT/long_ppl.err" &
PPL=$!

echo "== sinkstream bench --tokens $TOKENS --compare sink:4+1020,recompute:1024 --decode-steps 16 --dtype $DTYPE"
"$SS" bench --tokens "$TOKENS" --compare sink:4+1020,recompute:1024 --decode-steps 16 --dtype "$DTYPE" \
  --out "$OUT/long_bench" > "$OUT/long_bench.txt" 2> "$OUT/long_bench.err"
wait $PPL
cat "$OUT/long_ppl.txt" "$OUT/long_bench.txt"
cp "$OUT/long_ppl/ppl_curve.png" docs/img/ppl_long.png
cp "$OUT/long_bench/bench.png" docs/img/bench_long.png

#!/usr/bin/env bash
# Weight quantization (--quant) for docs/RESULTS.md: perplexity of sink(4,1020) over the books with float32,
# int8 and int4 weights, then decode speed against HF transformers dense at 2K context (bench_core.py).
# Usage: benchmarks/results_quant.sh [DATA_DIR]   (default ../shared/data). About 8 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
TOKENS=${TOKENS:-16000}
SS=${SS:-.venv/bin/sinkstream}
BOOKS=$(ls "$DATA"/pg*.txt | sort)
for q in none int8 int4; do
  echo "== --quant $q: sinkstream eval ppl \$BOOKS --tokens $TOKENS --mode banded --chunk 256 --compare sink:4+1020 --quant $q"
  "$SS" eval ppl $BOOKS --tokens "$TOKENS" --mode banded --chunk 256 --compare sink:4+1020 --quant "$q" -q
done
echo "== .venv/bin/python benchmarks/bench_core.py --sections hf --steps 40 --hf-ours none,int8,int4"
.venv/bin/python benchmarks/bench_core.py --sections hf --steps 40 --hf-ours none,int8,int4

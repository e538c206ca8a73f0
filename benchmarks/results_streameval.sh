#!/usr/bin/env bash
# StreamEval rerun for docs/RESULTS.md with replies long enough for LongEval's word labels (40 tokens).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
SS=${SS:-.venv/bin/sinkstream}
OUT=out/results
echo "== sinkstream eval recall --task streameval --lines-file \$DATA/longeval_lines_200.jsonl --compare dense,sink:4+508 --distances 10,20,40,80 --lines 100 --max-tokens 40"
"$SS" eval recall --task streameval --lines-file "$DATA/longeval_lines_200.jsonl" --compare dense,sink:4+508 \
  --distances 10,20,40,80 --lines 100 --max-tokens 40 --out "$OUT/streameval" -q | tee "$OUT/streameval.txt"
cp "$OUT/streameval/streameval.png" docs/img/recall_streameval.png

#!/usr/bin/env bash
# Fuzz `sinkstream serve` from its own OpenAPI document with schemathesis: no request may get a 5xx.
#
#   .venv/bin/pip install schemathesis      # not a test dependency; only this script needs it
#   bash benchmarks/server_schemathesis.sh [MAX_EXAMPLES_PER_OPERATION]   (default 100)
#
# Runs on a tiny random-weight model (SmolLM2's tokenizer and chat template) so the many valid
# generation requests stay fast, with an API key (sent by schemathesis) and a small --max-tokens.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ST=${ST:-.venv/bin/st}
N=${1:-100}
KEY=fuzz-key
TMP=$(mktemp -d)
SERVER_PID=
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$TMP"
}
trap cleanup EXIT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

"$PY" -c "import sys; from pathlib import Path; sys.path.insert(0, 'benchmarks'); \
from server_turns import tiny_model; tiny_model(Path('$TMP/tiny'))"

"$PY" -m sinkstream serve --model "$TMP/tiny" --model-name tiny --port 0 --state-dir "$TMP/state" \
  --api-key "$KEY" --max-tokens 16 --max-queue 64 --max-sessions 200 2>"$TMP/server.log" &
SERVER_PID=$!
URL=
for _ in $(seq 600); do
  URL=$(grep -o 'http://127.0.0.1:[0-9]*' "$TMP/server.log" | head -1 || true)
  if [ -n "$URL" ] && curl -sf "$URL/health" >/dev/null; then break; fi
  sleep 0.1
done
[ -n "$URL" ] || { cat "$TMP/server.log"; exit 1; }
echo "server $URL; schemathesis $("$ST" --version)"

five_xx() { curl -s "$URL/metrics" | grep '^sinkstream_requests_total' | grep 'status="5' || true; }
BEFORE=$(five_xx)   # /health answered 503 while this script waited for the model to load
status=0
"$ST" run "$URL/openapi.json" --checks not_a_server_error --max-examples "$N" --workers 1 \
  --header "Authorization: Bearer $KEY" --seed 1 --no-color --request-timeout 60 \
  --generation-database none --suppress-health-check all || status=$?
echo "--- server requests by status (from /metrics) ---"
curl -s "$URL/metrics" | grep '^sinkstream_requests_total' | \
  awk '{ split($1, a, "status=\""); split(a[2], b, "\""); n[b[1]] += $2 } END { for (s in n) print s, n[s] }' | sort
echo "--- 5xx answered during the fuzz run ---"
if [ "$(five_xx)" = "$BEFORE" ]; then echo "none"; else diff <(echo "$BEFORE") <(five_xx) || true; status=1; fi
if grep -q "Traceback" "$TMP/server.log"; then echo "--- server tracebacks ---"; grep -A 30 Traceback "$TMP/server.log" | head -80; fi
exit $status

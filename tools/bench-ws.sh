#!/usr/bin/env bash
# WebSocket against raw TCP on one `quire serve` (issue "browsers", benchmark), beside the
# ShareDB peer (WebSocket too) in the same sitting:
# - 1 client, an op at a time (`quire-trace --mode each --clients 1 --pipeline 1`): ack
#   latency p50/p99 and ops/s;
# - 64 clients on a document each, an op at a time each: ops/s and ack p50/p99;
# - ShareDB: `../shared/bench/peers/sharedb/run.sh` with 1 and 64 clients, a document
#   each (its "many" mode), memory backend.
#   usage: bash tools/bench-ws.sh [OUT_DIR]   (default /tmp/quire-wsbench)
# Settings: RUNS (default 3), PATCHES_1 (default 5000), PATCHES_64 (default 64000),
# SHAREDB (0/1, default 1), SHAREDB_OPS (default 20000).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-/tmp/quire-wsbench}"
mkdir -p "$out"
runs="${RUNS:-3}"
traces="${QUIRE_TRACES:-../shared/traces}"
paper="$traces/automerge-paper.json.gz"
port=7436
http=7437
cargo build --release --features trace --bin quire --bin quire-trace >/dev/null 2>&1

rm -rf "$out/data"
./target/release/quire serve --data-dir "$out/data" --listen "127.0.0.1:$port" \
  --http-listen "127.0.0.1:$http" --admin-listen off >"$out/server.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$http") 2>/dev/null && break
  sleep 0.1
done
base=100000000
echo "######## $(date -u +%FT%TZ) load $(cut -d' ' -f1 /proc/loadavg)"
for run in $(seq 1 "$runs"); do
  for transport in tcp ws; do
    flag=()
    [ "$transport" = ws ] && flag=(--ws "ws://127.0.0.1:$http/ws")
    for clients in 1 64; do
      patches=${PATCHES_1:-5000}
      [ "$clients" = 64 ] && patches=${PATCHES_64:-64000}
      base=$((base + 1000))
      line=$(./target/release/quire-trace --addr "127.0.0.1:$port" "${flag[@]}" --trace "$paper" \
        --mode each --clients "$clients" --pipeline 1 --patches "$patches" \
        --doc "b$run-$transport-$clients" --client-base "$base" 2>&1 | grep -o 'mode each.*')
      rate=$(grep -o '= [0-9]* ops/s' <<<"$line" | tr -dc '0-9')
      lat=$(grep -o 'p50 [0-9]* us p99 [0-9]* us' <<<"$line")
      printf 'quire %-3s run %s | clients %2s | %7s ops/s | ack %s | load %s\n' \
        "$transport" "$run" "$clients" "$rate" "$lat" "$(cut -d' ' -f1 /proc/loadavg)"
    done
  done
done
kill "$pid"; wait "$pid" 2>/dev/null || true
trap - EXIT

if [ "${SHAREDB:-1}" = 1 ]; then
  echo "## ShareDB peer (memory backend, a document per client), same sitting"
  CLIENTS="1 64" MODES=many REPEAT="$runs" WITH_PG=0 VERIFY_FULL=0 OPS="${SHAREDB_OPS:-20000}" \
    RESULTS="$out/sharedb.jsonl" bash ../shared/bench/peers/sharedb/run.sh 2>&1 | tail -n 20
fi

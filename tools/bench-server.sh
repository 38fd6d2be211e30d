#!/usr/bin/env bash
# The server benchmark of issue 4: quire-trace against `quire serve` for each workload,
# RUNS times, a fresh server (and data directory) per run, started WARM seconds before
# the run (after one warm-up op) so that the background zero fill of the next segment
# is not measured. Then, with
# PEERS=1, the peers of ../shared/bench/peers in the same sitting (fsync limit, Redis,
# PostgreSQL, ShareDB). One op in flight per client unless the line says compose or
# pipeline.
#   usage: bash tools/bench-server.sh [OUT_DIR]   (default /tmp/quire-serverbench)
# Settings: RUNS (default 3), WARM (seconds, default 4), PEERS (0/1, default 0).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-/tmp/quire-serverbench}"
mkdir -p "$out"
runs="${RUNS:-3}"
traces="${QUIRE_TRACES:-../shared/traces}"
paper="$traces/automerge-paper.json.gz"
ff="$traces/friendsforever.json.gz"
port=7431
cargo build --release --features trace --bin quire --bin quire-trace
log="$out/quire.log"
: >"$log"
workload() {
  local name="$1"; shift
  for run in $(seq 1 "$runs"); do
    rm -rf "$out/data"
    ./target/release/quire serve --data-dir "$out/data" --listen "127.0.0.1:$port" --admin-listen off >"$out/server.log" 2>&1 &
    local pid=$!
    sleep 1
    # One op first: it activates the first segment, and the background preparer then
    # zero-fills the next one; the run starts once that is done.
    ./target/release/quire-trace --addr "127.0.0.1:$port" --client-base 999000000 --mode sequential \
      --trace "$paper" --patches 1 --doc warmup >/dev/null
    sleep "${WARM:-4}"
    local result
    result=$(./target/release/quire-trace --addr "127.0.0.1:$port" --client-base $((run * 10000000)) "$@" 2>&1 | head -3 || true)
    kill "$pid"; wait "$pid" 2>/dev/null || true
    local totals
    totals=$(sed 's/\x1b\[[0-9;]*m//g' "$out/server.log" | grep -o 'batches=.*fsync_p99_us=[0-9]*' || true)
    printf '%s run %s | %s | wal %s\n' "$name" "$run" "$(echo "$result" | tr '\n' ' ')" "$totals" | tee -a "$log"
  done
}
echo "######## quire $(date -u +%FT%TZ)" | tee -a "$log"
workload ping --mode ping --patches 20000
workload one-client --trace "$paper" --mode sequential --patches 20000 --doc s
workload shared-16 --trace "$paper" --mode shared --clients 16 --patches 20000 --doc sh
workload each-16 --trace "$paper" --mode each --clients 16 --patches 20000 --doc e
workload each-64 --trace "$paper" --mode each --clients 64 --patches 64000 --doc e
workload compose-whole --trace "$paper" --mode sequential --compose --doc c
workload pipeline16-whole --trace "$paper" --mode sequential --pipeline 16 --doc p
workload friendsforever --trace "$ff" --mode concurrent --doc ff
echo "######## quire done $(date -u +%FT%TZ)" | tee -a "$log"
if [ "${PEERS:-0}" = 1 ]; then
  peers=../shared/bench/peers
  DUR="${DUR:-6}" RUNS="${PEER_RUNS:-2}" bash "$peers/run-all.sh" "$out/peers" fsync-limit redis postgres 2>&1 | tee "$out/peers.log"
  (cd "$peers/sharedb" && REPEAT=1 VERIFY_FULL=0 OPS=20000 bash run.sh) 2>&1 | tee "$out/sharedb.log"
fi

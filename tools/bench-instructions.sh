#!/usr/bin/env bash
# Instructions of `quire serve` per acknowledged op, counted by callgrind: the server runs
# under `valgrind --tool=callgrind` with instrumentation off; after a warm-up op it is
# switched on (callgrind_control -i on) for OPS ops of the 64-client load that
# tools/bench-cpu.sh runs (quire-trace, a document per client, one event loop), then off.
# A count, not a time: it moves by about 0.1% between runs of one build where CPU time
# moves by 10%, so an A/B of two builds needs one run each (QUIRE_BIN=... for the other).
# Under valgrind the CPU's SHA extensions are not used: the op's fingerprint (SHA-256)
# costs about 3,600 instructions per op in software, a few hundred on the real CPU.
#   usage: bash tools/bench-instructions.sh [OUT_DIR]   (default /tmp/quire-instructions)
# Settings: OPS (default 6400), CLIENTS (default 64), QUIRE_BIN (default
# ./target/release/quire). Writes OUT_DIR/callgrind.out (callgrind_annotate
# --inclusive=yes OUT_DIR/callgrind.out for where they go).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-/tmp/quire-instructions}"
ops="${OPS:-6400}"
clients="${CLIENTS:-64}"
bin="${QUIRE_BIN:-./target/release/quire}"
port=7433
traces="${QUIRE_TRACES:-../shared/traces}"
paper="$traces/automerge-paper.json.gz"
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 1; }
cargo build --release --features trace --bin quire --bin quire-trace >/dev/null 2>&1
rm -rf "$out"
mkdir -p "$out"
valgrind --tool=callgrind --callgrind-out-file="$out/callgrind.out" --instr-atstart=no \
  "$bin" serve --data-dir "$out/data" --listen "127.0.0.1:$port" --admin-listen off \
  >"$out/server.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  grep -q "serving" "$out/server.log" && break
  sleep 0.5
done
grep -q "serving" "$out/server.log" || { cat "$out/server.log" >&2; exit 1; }
./target/release/quire-trace --addr "127.0.0.1:$port" --client-base 999000000 --mode sequential \
  --trace "$paper" --patches 1 --doc warmup >/dev/null
callgrind_control -i on "$pid" >/dev/null 2>&1
./target/release/quire-trace --addr "127.0.0.1:$port" --client-base 10000000 --trace "$paper" \
  --mode each --clients "$clients" --patches "$ops" --doc e --threads 1 >/dev/null
callgrind_control -i off "$pid" >/dev/null 2>&1
kill -TERM "$pid"
wait "$pid" || true
trap - EXIT
ir=$(grep -o "I *refs: *[0-9,]*" "$out/server.log" | tr -dc 0-9)
echo "$(date -u +%FT%TZ) $bin: $ir instructions over $ops acked ops, $((ir / ops)) per op"

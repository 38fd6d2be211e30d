#!/usr/bin/env bash
# The storage benchmark of issue 3, in one sitting: the disk's fsync limit and okaywal
# (from ../shared/bench/peers), then quire's append-to-durable benchmark and recovery
# speed, one after another (they share the disk and the two cores).
#   usage: bash tools/bench-storage.sh [OUT_DIR]   (default /tmp/quire-bench)
# Settings: DUR (seconds per peer run, default 6), RUNS (default 2), RECOVERY_MIB (1024).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-/tmp/quire-bench}"
mkdir -p "$out"
peers=../shared/bench/peers
export DUR="${DUR:-6}" RUNS="${RUNS:-2}"
cargo build --release --bin wal-bench
echo "######## peers: fsync-limit okaywal $(date -u +%FT%TZ)" | tee "$out/peers.log"
bash "$peers/run-all.sh" "$out/peers" fsync-limit okaywal 2>&1 | tee -a "$out/peers.log"
for run in $(seq 1 "$RUNS"); do
  echo "######## quire wal-bench append, run $run $(date -u +%FT%TZ)" | tee -a "$out/quire.log"
  ./target/release/wal-bench append --dir "$out/quire-data" --seconds "$DUR" 2>&1 | tee -a "$out/quire.log"
done
echo "######## quire wal-bench append without zero fill (fallocate only)" | tee -a "$out/quire.log"
./target/release/wal-bench append --dir "$out/quire-data" --seconds "$DUR" --no-zero-fill 2>&1 | tee -a "$out/quire.log"
echo "######## quire recovery of a ${RECOVERY_MIB:-1024} MiB log" | tee -a "$out/quire.log"
./target/release/wal-bench recovery --dir "$out/quire-data" --mib "${RECOVERY_MIB:-1024}" 2>&1 | tee -a "$out/quire.log"
echo "######## done $(date -u +%FT%TZ)" | tee -a "$out/quire.log"

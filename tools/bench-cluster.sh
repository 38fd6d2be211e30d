#!/usr/bin/env bash
# Cluster mode against a single node, in one sitting (issue 13, benchmark):
# - 1 client, an op at a time (`quire-trace --mode each --clients 1 --pipeline 1`): ack
#   p50/p99 and ops/s, on a single node and on node 1 of a three-node cluster;
# - 64 clients on a document each, an op at a time: on the single node, and on the
#   cluster as three quire-trace processes (22, 21, 21 clients), one per node, run at
#   once (each document goes to its preferred owner by rendezvous hashing, the clients
#   following their redirects): ops/s summed, ack p50/p99 per process;
# - etcd bytes written per op: the growth of etcd_disk_wal_write_bytes_total summed over
#   the three members during the 64-client cluster run, over its ops;
# - CPU during the 64-client cluster run: the machine's busy share (/proc/stat), the
#   utime+stime of the etcd members and of the quire nodes, and the rest (the load
#   generators, the kernel's threads), each per op too: is the cluster bound by CPU?
# - failover: SIGKILL of the node owning a document, until an op on it is acknowledged
#   through another node (a loop of one-op quire-trace runs).
# The three etcd members, the three nodes and the single node run on this machine.
#   usage: bash tools/bench-cluster.sh [OUT_DIR]   (default /tmp/quire-clusterbench)
# Settings: RUNS (default 3), PATCHES_1 (default 3000), PATCHES_64 (default 64000).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-/tmp/quire-clusterbench}"
rm -rf "$out"; mkdir -p "$out"
runs="${RUNS:-3}"
traces="${QUIRE_TRACES:-../shared/traces}"
paper="$traces/automerge-paper.json.gz"
cargo build --release --features cluster,trace --bin quire --bin quire-trace >/dev/null 2>&1
bin=./target/release

pids=()
trap 'kill -9 "${pids[@]}" 2>/dev/null || true' EXIT
initial=m1=http://127.0.0.1:2480,m2=http://127.0.0.1:2482,m3=http://127.0.0.1:2484
for i in 1 2 3; do
  etcd --name m$i --data-dir "$out/etcd-m$i" \
    --listen-peer-urls http://127.0.0.1:$((2478 + 2*i)) \
    --initial-advertise-peer-urls http://127.0.0.1:$((2478 + 2*i)) \
    --listen-client-urls http://127.0.0.1:$((2477 + 2*i)) \
    --advertise-client-urls http://127.0.0.1:$((2477 + 2*i)) \
    --initial-cluster $initial --initial-cluster-state new --initial-cluster-token bench \
    --auto-compaction-mode revision --auto-compaction-retention 1000 2>"$out/etcd-m$i.log" &
  pids+=($!)
done
etcd_urls=http://127.0.0.1:2479,http://127.0.0.1:2481,http://127.0.0.1:2483
sleep 2
for i in 1 2 3; do
  $bin/quire serve --etcd $etcd_urls --node-id n$i --listen 127.0.0.1:$((7450 + i)) \
    --advertise 127.0.0.1:$((7450 + i)) --data-dir "$out/n$i" --admin-listen off \
    2>"$out/n$i.log" &
  pids+=($!)
done
$bin/quire serve --listen 127.0.0.1:7450 --data-dir "$out/single" --admin-listen off \
  2>"$out/single.log" &
pids+=($!)
for port in 7450 7451 7452 7453; do
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
  done
done

wal_bytes() {
  local sum=0
  for port in 2479 2481 2483; do
    local b
    b=$(curl -s "http://127.0.0.1:$port/metrics" | awk '/^etcd_disk_wal_write_bytes_total/ {print $2}')
    sum=$(python3 -c "print(int($sum + float('${b:-0}')))")
  done
  echo "$sum"
}

trace() { # addr clients patches doc base
  $bin/quire-trace --addr "$1" --trace "$paper" --mode each --clients "$2" --pipeline 1 \
    --patches "$3" --doc "$4" --client-base "$5" 2>&1 | grep -o 'mode each.*'
}
rate() { grep -o '= [0-9]* ops/s' <<<"$1" | tr -dc '0-9'; }
# utime+stime of processes, in clock ticks; and the machine's busy and total ticks (all
# CPUs) from /proc/stat.
ticks() { local s=0 p; for p in "$@"; do s=$((s + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$s"; }
machine() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8, $2 + $3 + $4 + $5 + $6 + $7 + $8}' /proc/stat; }
hz=$(getconf CLK_TCK)
lat() { grep -o 'p50 [0-9]* us p99 [0-9]* us' <<<"$1"; }

echo "######## $(date -u +%FT%TZ) load $(cut -d' ' -f1 /proc/loadavg)"
base=200000000
for run in $(seq 1 "$runs"); do
  for target in single cluster; do
    addr=127.0.0.1:7450; [ $target = cluster ] && addr=127.0.0.1:7451
    base=$((base + 1000))
    line=$(trace $addr 1 "${PATCHES_1:-3000}" "r$run-$target-1" $base)
    printf '%-7s run %s | clients  1 | %7s ops/s | ack %s\n' $target "$run" "$(rate "$line")" "$(lat "$line")"
  done
  base=$((base + 1000))
  line=$(trace 127.0.0.1:7450 64 "${PATCHES_64:-64000}" "r$run-single-64" $base)
  printf 'single  run %s | clients 64 | %7s ops/s | ack %s\n' "$run" "$(rate "$line")" "$(lat "$line")"
  before=$(wal_bytes)
  e0=$(ticks "${pids[@]:0:3}"); q0=$(ticks "${pids[@]:3:3}"); read -r busy0 all0 < <(machine)
  p=${PATCHES_64:-64000}
  for i in 1 2 3; do
    n=21; [ $i = 1 ] && n=22
    trace 127.0.0.1:$((7450 + i)) $n $((p * n / 64)) "r$run-cluster-64-n$i" $((base + 100 * i)) \
      >"$out/c64-$run-$i.txt" &
  done
  wait_for=$(jobs -p | tail -n 3)
  for j in $wait_for; do wait "$j"; done
  e1=$(ticks "${pids[@]:0:3}"); q1=$(ticks "${pids[@]:3:3}"); read -r busy1 all1 < <(machine)
  after=$(wal_bytes)
  total=0; lats=""
  for i in 1 2 3; do
    l=$(cat "$out/c64-$run-$i.txt")
    total=$((total + $(rate "$l")))
    lats="$lats [$(lat "$l")]"
  done
  printf 'cluster run %s | clients 64 | %7s ops/s | ack %s | etcd WAL %s B/op\n' "$run" "$total" "$lats" \
    "$(python3 -c "print(round(($after - $before) / $p))")"
  # Where the machine's CPU went during that run (is it bound by CPU?).
  awk -v e=$((e1 - e0)) -v q=$((q1 - q0)) -v b=$((busy1 - busy0)) -v a=$((all1 - all0)) -v hz="$hz" \
    -v ops="$p" -v run="$run" 'BEGIN {
      printf "cluster run %s | cpu | machine busy %.0f%% | etcd members %.2f s, quire nodes %.2f s, the rest %.2f s | per op: etcd %.0f us, quire %.0f us\n",
        run, 100 * b / a, e / hz, q / hz, (b - e - q) / hz, 1e6 * e / hz / ops, 1e6 * q / hz / ops }'
done

# Where the cluster's ack time goes, from etcd's own histograms (means over the whole
# sitting): its WAL fsync, its backend commit, and the round trip to its peers.
for port in 2479 2481 2483; do
  curl -s "http://127.0.0.1:$port/metrics" | awk -v port=$port '
    /^etcd_disk_wal_fsync_duration_seconds_(sum|count)/ { v[$1]=$2 }
    /^etcd_disk_backend_commit_duration_seconds_(sum|count)/ { v[$1]=$2 }
    END {
      printf "etcd :%s | wal fsync mean %.0f us over %d | backend commit mean %.0f us over %d\n", port,
        1e6 * v["etcd_disk_wal_fsync_duration_seconds_sum"] / v["etcd_disk_wal_fsync_duration_seconds_count"],
        v["etcd_disk_wal_fsync_duration_seconds_count"],
        1e6 * v["etcd_disk_backend_commit_duration_seconds_sum"] / v["etcd_disk_backend_commit_duration_seconds_count"],
        v["etcd_disk_backend_commit_duration_seconds_count"]
    }'
done

# Failover: n2 owns "failover-8-0" (its preferred owner among n1, n2 and n3, by the
# weights src/cluster/hashing.rs pins); kill it, then time until an op on it is
# acknowledged through n1 (directly or by redirect).
trace 127.0.0.1:7452 1 10 failover-8 900000000 >/dev/null
kill -9 "${pids[4]}"
start=$(date +%s%N)
# Each attempt is cut after a second (a redirect to the dead owner fails at once, an
# attempt that waits is cut).
attempt=0
until timeout 1 $bin/quire-trace --addr 127.0.0.1:7451 --trace "$paper" --mode each --clients 1 \
  --pipeline 1 --patches 1 --doc failover-8 --client-base $((900001000 + attempt)) >/dev/null 2>&1; do
  attempt=$((attempt + 1))
  sleep 0.05
done
end=$(date +%s%N)
echo "failover: n2 killed -> an op on its document acknowledged through n1 in $(( (end - start) / 1000000 )) ms (--lease-ttl-secs 5)"

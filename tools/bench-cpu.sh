#!/usr/bin/env bash
# Server CPU per acknowledged op (issue "simulation", item 6): quire-trace with CLIENTS
# clients on a document each against `quire serve`, and redis-benchmark RPUSH with the
# same number of clients (pipeline 1) against redis-server with `appendfsync always`, in
# the same sitting. For each run: the server's utime+stime (/proc/PID/stat fields 14 and
# 15, clock ticks) read just before and just after the load (for quire its connects,
# opens and final read-back included), divided by the ops
# acknowledged, with the user and system parts apart, and ops/s as the load generator
# reports it. The load average is printed beside each row: the machine is shared. Under
# each quire row, the same per thread name (/proc/PID/task/*/stat): the runtime's worker
# apart from the log's writer (threads that exit during the run are in the row's figure,
# not in this line).
#   usage: bash tools/bench-cpu.sh [OUT_DIR]   (default /tmp/quire-cpubench)
# Settings: RUNS (default 3), CLIENTS (default 64), PATCHES (quire ops, default 64000),
# REDIS_N (RPUSH requests, default 64000), WARM (seconds, default 3), REDIS (0/1,
# default 1), QUIRE_BIN (the server binary, default ./target/release/quire; another
# build for an A/B in one sitting), SERVE_ARGS (extra flags for `quire serve`), PERF
# (0/1, default 0: `perf record -g` the quire server of the last run into
# OUT_DIR/perf.data), LOAD_ARGS (extra flags for the quire load generator; default
# `--threads 1`: one event loop, as redis-benchmark runs by default, so that both load
# generators take at most one of the machine's cores from the server; add
# `--pipeline 1` for the bare protocol connection instead of the client API), FLOOR
# (0/1, default 1 with REDIS=1: the rows of tools/tokio-floor.rs, below).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-/tmp/quire-cpubench}"
mkdir -p "$out"
runs="${RUNS:-3}"
clients="${CLIENTS:-64}"
patches="${PATCHES:-64000}"
redis_n="${REDIS_N:-64000}"
val_len=100  # bytes of each RPUSH value (redis-benchmark -d)
traces="${QUIRE_TRACES:-../shared/traces}"
paper="$traces/automerge-paper.json.gz"
port=7432
redis_port=63798
tck=$(getconf CLK_TCK)
cargo build --release --features trace --bin quire --bin quire-trace --bin tokio-floor >/dev/null 2>&1

# utime and stime of a process, in clock ticks ("user system").
cpu_ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }
# The same for each thread of a process: "tid name user system" per line.
thread_ticks() {
  local t
  for t in /proc/"$1"/task/*; do
    printf '%s %s %s\n' "${t##*/}" "$(tr -d ' ' <"$t/comm")" "$(awk '{print $14, $15}' "$t/stat")"
  done 2>/dev/null
}
# The threads' share of a run (from two thread_ticks snapshots), summed by thread name:
# for quire, the runtime's worker(s) apart from the log's writer and the rest.
threads_row() {  # before after ops
  awk -v ops="$3" -v hz="$tck" '
    FNR == NR { u[$1] = $3; s[$1] = $4; next }
    { du[$2] += $3 - u[$1]; ds[$2] += $4 - s[$1] }
    END { line = "             threads:";
      for (n in du) if (du[n] + ds[n] > 0)
        line = line sprintf(" %s %.2f us/op (user %.2f, system %.2f);", n,
          1e6 * (du[n] + ds[n]) / hz / ops, 1e6 * du[n] / hz / ops, 1e6 * ds[n] / hz / ops)
      print line }' <(echo "$1") <(echo "$2")
}
load() { cut -d' ' -f1 /proc/loadavg; }
row() {  # name run ops ops_per_s "user0 sys0" "user1 sys1" load_before load_after
  read -r u0 s0 <<<"$5"
  read -r u1 s1 <<<"$6"
  awk -v n="$1" -v r="$2" -v ops="$3" -v rate="$4" -v u=$((u1 - u0)) -v s=$((s1 - s0)) \
    -v hz="$tck" -v l0="$7" -v l1="$8" \
    'BEGIN{t = u + s; printf "%-12s run %s | ops %d | %8.0f ops/s | server cpu %.2f s = %5.2f us/op (user %5.2f, system %5.2f) | load %s..%s\n",
      n, r, ops, rate, t / hz, 1e6 * t / hz / ops, 1e6 * u / hz / ops, 1e6 * s / hz / ops, l0, l1}'
}

echo "######## $(date -u +%FT%TZ) clients=$clients quire load generator: ${LOAD_ARGS---threads 1}"
for run in $(seq 1 "$runs"); do
  rm -rf "$out/data"
  # shellcheck disable=SC2086
  "${QUIRE_BIN:-./target/release/quire}" serve --data-dir "$out/data" --listen "127.0.0.1:$port" --admin-listen off ${SERVE_ARGS:-} >"$out/server.log" 2>&1 &
  pid=$!
  sleep 1
  # A warm-up op activates the first segment; the next one is zero-filled meanwhile.
  ./target/release/quire-trace --addr "127.0.0.1:$port" --client-base 999000000 --mode sequential \
    --trace "$paper" --patches 1 --doc warmup >/dev/null
  sleep "${WARM:-3}"
  perf_pid=
  if [ "${PERF:-0}" = 1 ] && [ "$run" = "$runs" ]; then
    perf record -F 4000 -g -o "$out/perf.data" -p "$pid" >/dev/null 2>&1 &
    perf_pid=$!
    sleep 0.5
  fi
  l0=$(load); c0=$(cpu_ticks "$pid"); t0=$(thread_ticks "$pid")
  # shellcheck disable=SC2086
  result=$(./target/release/quire-trace --addr "127.0.0.1:$port" --client-base $((run * 10000000)) \
    --trace "$paper" --mode each --clients "$clients" --patches "$patches" --doc e \
    ${LOAD_ARGS---threads 1} 2>&1)
  c1=$(cpu_ticks "$pid"); t1=$(thread_ticks "$pid"); l1=$(load)
  [ -n "$perf_pid" ] && { kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null || true; }
  kill "$pid"; wait "$pid" 2>/dev/null || true
  echo "$result" >"$out/quire-run$run.txt"
  rate=$(grep -o '[0-9.]* ops/s' <<<"$result" | head -1 | cut -d' ' -f1)
  ops=$(grep -o '[0-9]* ops in' <<<"$result" | head -1 | cut -d' ' -f1)
  row quire "$run" "${ops:-$patches}" "${rate:-0}" "$c0" "$c1" "$l0" "$l1"
  threads_row "$t0" "$t1" "${ops:-$patches}"
done

if [ "${REDIS:-1}" = 1 ]; then
  rm -rf "$out/redis"; mkdir -p "$out/redis"
  redis-server --bind 127.0.0.1 --port "$redis_port" --protected-mode yes --dir "$out/redis" \
    --appendonly yes --appendfsync always --save "" --daemonize no \
    --logfile "$out/redis/redis.log" &
  rpid=$!
  trap 'kill "$rpid" 2>/dev/null || true' EXIT
  cli=(redis-cli -h 127.0.0.1 -p "$redis_port")
  for _ in $(seq 1 100); do "${cli[@]}" ping >/dev/null 2>&1 && break; sleep 0.1; done
  for run in $(seq 1 "$runs"); do
    "${cli[@]}" flushall >/dev/null
    sleep 1
    l0=$(load); c0=$(cpu_ticks "$rpid")
    csv=$(redis-benchmark -h 127.0.0.1 -p "$redis_port" -c "$clients" -P 1 -n "$redis_n" \
      --csv -t rpush -d "$val_len" 2>/dev/null | tail -1)
    c1=$(cpu_ticks "$rpid"); l1=$(load)
    stored=$("${cli[@]}" llen mylist)
    rate=$(cut -d, -f2 <<<"$csv" | tr -d '"')
    row redis-rpush "$run" "$stored" "${rate:-0}" "$c0" "$c1" "$l0" "$l1"
  done
  kill "$rpid"; wait "$rpid" 2>/dev/null || true
  trap - EXIT
fi

# The floors (tools/tokio-floor.rs), driven by the same redis-benchmark load as Redis:
# `floor-tokio` answers each RPUSH at once; `floor-log` answers it once appended to
# quire's log and synced by the log's writer thread, as `quire serve` does (what quire
# spends above it is its own per-op work); `floor-inline` has the worker sync before
# it goes idle, as Redis's one thread does (what floor-log spends above it is the cost
# of the writer thread's hand-offs).
if [ "${REDIS:-1}" = 1 ] && [ "${FLOOR:-1}" = 1 ]; then
  floor_port=7434
  for mode in tokio log inline; do
    for run in $(seq 1 "$runs"); do
      rm -rf "$out/floor"
      floor_args=()
      [ "$mode" != tokio ] && floor_args=(--data-dir "$out/floor")
      [ "$mode" = inline ] && floor_args+=(--sync-on-worker)
      ./target/release/tokio-floor --listen "127.0.0.1:$floor_port" "${floor_args[@]}" \
        >"$out/floor.log" 2>&1 &
      fpid=$!
      trap 'kill "$fpid" 2>/dev/null || true' EXIT
      for _ in $(seq 1 100); do grep -q serving "$out/floor.log" && break; sleep 0.1; done
      grep -q serving "$out/floor.log" || { echo "tokio-floor did not start:" >&2; cat "$out/floor.log" >&2; exit 1; }
      # As for quire: a warm-up request activates the log's first segment.
      redis-benchmark -h 127.0.0.1 -p "$floor_port" -c 1 -n 1 -t rpush >/dev/null 2>&1
      sleep "${WARM:-3}"
      l0=$(load); c0=$(cpu_ticks "$fpid"); t0=$(thread_ticks "$fpid")
      csv=$(redis-benchmark -h 127.0.0.1 -p "$floor_port" -c "$clients" -P 1 -n "$redis_n" \
        --csv -t rpush -d "$val_len" 2>/dev/null | tail -1)
      c1=$(cpu_ticks "$fpid"); t1=$(thread_ticks "$fpid"); l1=$(load)
      rate=$(cut -d, -f2 <<<"$csv" | tr -d '"')
      row "floor-$mode" "$run" "$redis_n" "${rate:-0}" "$c0" "$c1" "$l0" "$l1"
      threads_row "$t0" "$t1" "$redis_n"
      kill "$fpid"; wait "$fpid" 2>/dev/null || true
      trap - EXIT
    done
  done
fi

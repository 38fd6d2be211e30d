#!/usr/bin/env bash
# The limit probes: quire-probe against a fresh `quire serve` (and data directory) per
# probe; one summary line per probe, stamped with the UTC time and the load average
# (`uptime`) at its start and end, in OUT_DIR/limits.log. Every probe is bounded in
# time and its server is stopped (SIGTERM, then SIGKILL after 10 s) when it ends.
#   usage: bash tools/bench-limits.sh BIN OUT_DIR
# BIN is the quire binary; quire-probe is taken from beside it (or $PROBE).
# Settings: PORT (first port tried, default 7441), PROBE_TIMEOUT (seconds per probe,
# default 120), IDLE_HOLD_SECS (idle probes: wait before counting the connections the
# server still holds, default 0), ONLY (run only the probes whose names contain it).
set -uo pipefail
if [ $# -ne 2 ]; then
  echo "usage: bash tools/bench-limits.sh BIN OUT_DIR" >&2
  exit 2
fi
bin="$1"
out="$2"
probe_bin="${PROBE:-$(dirname "$bin")/quire-probe}"
limit="${PROBE_TIMEOUT:-120}"
hold="${IDLE_HOLD_SECS:-0}"
for b in "$bin" "$probe_bin"; do
  [ -x "$b" ] || { echo "not executable: $b" >&2; exit 2; }
done
mkdir -p "$out"
log="$out/limits.log"

# The idle probes hold 10,000 connections: both the probe and the server (started
# from this shell, so it inherits the limit) need that many descriptors.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
port="${PORT:-7441}"
for _ in $(seq 1 50); do
  port_busy "$port" || break
  port=$((port + 1))
done
if port_busy "$port"; then
  echo "no free port from ${PORT:-7441}" >&2
  exit 1
fi

server_pid=""
start_server() {
  rm -rf "$out/data"
  "$bin" serve --data-dir "$out/data" --listen "127.0.0.1:$port" --admin-listen off >"$out/server-$1.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 1 100); do
    port_busy "$port" && return 0
    kill -0 "$server_pid" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}
stop_server() {
  [ -n "$server_pid" ] || return 0
  kill "$server_pid" 2>/dev/null
  for _ in $(seq 1 100); do
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "$server_pid" 2>/dev/null
  wait "$server_pid" 2>/dev/null
  server_pid=""
}
trap stop_server EXIT

load() { uptime | sed 's/.*load average: //; s/,//g'; }

# probe NAME SUBCOMMAND ARGS...: a fresh server, the probe, one line.
probe() {
  local name="$1"; shift
  case "$name" in *"${ONLY:-}"*) ;; *) return 0 ;; esac
  local started load_start line rc alive
  started=$(date -u +%FT%TZ)
  load_start=$(load)
  if start_server "$name"; then
    line=$(timeout -k 5 "$limit" "$probe_bin" "$@" --addr "127.0.0.1:$port" --pid "$server_pid" \
      2>"$out/probe-$name.err")
    rc=$?
    [ -n "$line" ] || line="no summary (see probe-$name.err)"
    if kill -0 "$server_pid" 2>/dev/null; then alive=yes; else alive=no; fi
  else
    rc=-
    alive=no
    line="the server did not start (see server-$name.log)"
  fi
  stop_server
  printf '%s %s load=[%s]->[%s] rc=%s server_alive=%s | %s\n' \
    "$started" "$name" "$load_start" "$(load)" "$rc" "$alive" "$line" | tee -a "$log"
}

echo "######## limits $(date -u +%FT%TZ) port=$port nofile=$(ulimit -n) nproc=$(nproc) load=[$(load)]" | tee -a "$log"
probe big-op-60000 big-op --patches 60000 --base-chars 23000 --timeout-secs 75
probe big-op-16000 big-op --patches 16000 --base-chars 23000 --timeout-secs 75
probe idle-plain idle --conns 10000 --hold-secs "$hold"
probe idle-hello idle --conns 10000 --hello --hold-secs "$hold"
probe half-frames half-frames --conns 300 --bytes $(((1 << 20) - 64))
probe slow-reader slow-reader --ops 200 --op-bytes 500000 --timeout-secs 60
# The same with a subscriber that reads: what the document itself costs.
probe slow-reader-control slow-reader --ops 200 --op-bytes 500000 --timeout-secs 60 --subscriber-reads
# Memory at scale: 10,000 connections keeping 10,000 documents of 1,000 characters open.
probe docs-10000 docs --conns 10000 --docs 10000 --chars 1000
echo "######## limits done $(date -u +%FT%TZ)" | tee -a "$log"

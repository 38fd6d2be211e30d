#!/usr/bin/env bash
# Runs the README's Operations chapter as written: every ```sh block between an
# `<!-- ops:begin -->` and an `<!-- ops:end -->` line, in order, in one bash process, in a
# fresh scratch directory, with target/release on the PATH. Stops at the first failing
# command (set -e), prints each command (set -x), and kills the servers it started.
#   usage: bash tools/ops-walkthrough.sh   (after cargo build --release --features trace)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export PATH="$root/target/release:$PATH"
export QUIRE_TRACES="${QUIRE_TRACES:-$root/../shared/traces}"
for bin in quire wal-inspect quire-trace; do
  command -v "$bin" >/dev/null || { echo "missing $bin: cargo build --release --features trace" >&2; exit 2; }
done
scratch="$(mktemp -d)"
script="$scratch/walkthrough.sh"
awk '
  /<!-- ops:begin -->/ { inside = 1; next }
  /<!-- ops:end -->/ { inside = 0; next }
  inside && /^```sh$/ { block = 1; next }
  block && /^```$/ { block = 0; next }
  block { print }
' "$root/README.md" >"$script"
if [ ! -s "$script" ]; then
  echo "no ops blocks found in README.md" >&2
  exit 1
fi
echo "running $(wc -l <"$script") lines of README commands in $scratch"
cleanup() {
  # Every quire server this walkthrough started (children of this shell's script).
  pkill -f "quire serve --data-dir ./quire-data" 2>/dev/null || true
  pkill -f "quire serve --data-dir ./restored" 2>/dev/null || true
  rm -rf "$scratch"
}
trap cleanup EXIT
(cd "$scratch" && bash -euxo pipefail "$script")
echo "the README's operations commands ran as written"

#!/usr/bin/env bash
# Reintroduces serving-core failures, one at a time, into a scratch copy of the tree and
# runs the simulator's CI seeds against each: every mutant must make it fail. Prints,
# per mutant, the first failing seed (how many seeds it took) and the failure.
#
#   bash tools/sim-mutants.sh            # every mutant in tools/sim-mutants/
#   ONLY=dedupe bash tools/sim-mutants.sh
#   SEEDS=0..200 bash tools/sim-mutants.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
seeds=${SEEDS:-0..40}
steps=${STEPS:-2000}
scratch=${SCRATCH:-/tmp/quire-mutants}
mkdir -p "$scratch"
status=0
for patch in "$root"/tools/sim-mutants/*.patch; do
  name=$(basename "$patch" .patch)
  if [ -n "${ONLY:-}" ] && [[ "$name" != *"$ONLY"* ]]; then continue; fi
  dir="$scratch/$name"
  rm -rf "$dir/src" "$dir/tests"
  mkdir -p "$dir"
  # The tree as committed plus what is in the working copy, without target/.
  (cd "$root" && git ls-files -z --cached --others --exclude-standard) |
    (cd "$root" && xargs -0 cp --parents -t "$dir")
  # One target directory for every mutant (CI passes the repository's own, whose
  # dependencies are built already): only the patched crate recompiles.
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$scratch/target}"
  (cd "$dir" && patch -s -p1 < "$patch")
  echo "== $name: $(sed -n 's/^# //p' "$patch" | head -1)"
  (cd "$dir" && cargo build -q --release --test sim 2>&1 | tail -5)
  if out=$(cd "$dir" && cargo test -q --release --test sim -- --seeds "$seeds" --steps "$steps" 2>/dev/null); then
    echo "   NOT CAUGHT in seeds $seeds"
    status=1
  else
    echo "$out" | grep -E '^seed [0-9]+: FAILED|^replay:' | sed 's/^/   /'
    first=$(echo "$out" | sed -n 's/^seed \([0-9]*\): FAILED.*/\1/p')
    start=${seeds%%..*}
    echo "   caught at seed $first: $((first - start + 1)) seed(s) run"
  fi
done
exit $status

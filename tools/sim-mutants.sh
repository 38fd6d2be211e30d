#!/usr/bin/env bash
# Reintroduces serving-core failures, one at a time, into a scratch copy of the tree and
# runs the simulator's CI seeds against each: every mutant must make it fail. Prints,
# per mutant, the first failing seed (how many seeds it took) and the failure.
#
#   bash tools/sim-mutants.sh            # every mutant in tools/sim-mutants/
#   ONLY=dedupe bash tools/sim-mutants.sh
#   SEEDS=0..2000 bash tools/sim-mutants.sh   (default: the 500 seeds CI runs)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
seeds=${SEEDS:-0..500}
steps=${STEPS:-2000}
scratch=${SCRATCH:-/tmp/quire-mutants}
mkdir -p "$scratch"
status=0
# First the tree unchanged (the control: it must pass, or a "caught" below means
# nothing), then each mutant.
for patch in none "$root"/tools/sim-mutants/*.patch; do
  name=$(basename "$patch" .patch)
  if [ "$patch" != none ] && [ -n "${ONLY:-}" ] && [[ "$name" != *"$ONLY"* ]]; then continue; fi
  # One copy of the tree, refreshed for each mutant, and its own target directory: a
  # second copy of the crate sharing a target directory with the repository would get
  # the same artifact names, and cargo could take one's build for the other's.
  dir="$scratch/tree"
  rm -rf "$dir"
  mkdir -p "$dir"
  # The tree as committed plus what is in the working copy, without target/ (copying
  # gives every file a new mtime, so cargo rebuilds the crate for each mutant).
  (cd "$root" && git ls-files -z --cached --others --exclude-standard) |
    (cd "$root" && xargs -0 cp --parents -t "$dir")
  export CARGO_TARGET_DIR="$scratch/target"
  if [ "$patch" = none ]; then
    echo "== control: the tree as it is"
    (cd "$dir" && cargo build -q --profile mutants --test sim 2>&1 | tail -5)
    if ! out=$(cd "$dir" && cargo test -q --profile mutants --test sim -- --seeds "$seeds" --steps "$steps" 2>/dev/null); then
      echo "$out" | tail -3 | sed 's/^/   /'
      echo "   the unchanged tree fails: fix that first" >&2
      exit 1
    fi
    echo "   $(echo "$out" | tail -1)"
    continue
  fi
  (cd "$dir" && patch -s -p1 < "$patch")
  echo "== $name: $(sed -n 's/^# //p' "$patch" | head -1)"
  # A mutant that does not build proves nothing (its patch is stale): say so, fail.
  if ! build=$(cd "$dir" && cargo build -q --profile mutants --test sim 2>&1); then
    echo "$build" | grep -E '^error' -A6 | head -20 | sed 's/^/   /'
    echo "   DOES NOT BUILD: update tools/sim-mutants/$name.patch"
    status=1
    continue
  fi
  if out=$(cd "$dir" && cargo test -q --profile mutants --test sim -- --seeds "$seeds" --steps "$steps" 2>/dev/null); then
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

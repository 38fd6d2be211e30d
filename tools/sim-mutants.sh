#!/usr/bin/env bash
# Reintroduces serving-core failures, one at a time, into a scratch copy of the tree and
# runs the simulator's CI seeds against each: every mutant must make it fail. Prints,
# per mutant, the first failing seed (how many seeds it took) and the failure.
#
#   bash tools/sim-mutants.sh            # every mutant in tools/sim-mutants/
#   ONLY=dedupe bash tools/sim-mutants.sh
#   SEEDS=0..2000 bash tools/sim-mutants.sh   (default: the 500 seeds CI runs)
#
# A patch with a line `# world: cluster` is a failure of cluster mode: it runs the
# cluster world's seeds (CLUSTER_SEEDS, default the 400 CI runs, of CLUSTER_STEPS, 400).
# CONTROL=0 skips the control run of the unchanged tree (.ci/run: its tests step has
# just run the simulator on that tree, with the same seeds).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
seeds=${SEEDS:-0..500}
steps=${STEPS:-2000}
cluster_seeds=${CLUSTER_SEEDS:-0..400}
cluster_steps=${CLUSTER_STEPS:-400}
scratch=${SCRATCH:-/tmp/quire-mutants}
# The mutants build in the repository's own target directory with its release profile,
# so that they share every dependency `cargo test --release` built there (in CI, 3 min of
# a from-scratch build saved): only the crate itself is rebuilt, incrementally.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
export CARGO_INCREMENTAL=1
mkdir -p "$scratch"
status=0

# The copy's manifest: the package renamed `quire-mutant` (its library still `quire`, so
# the tests build unchanged), without binaries or examples (the simulator needs neither).
# A copy under the same package name would get the same artifact names as the
# repository's own crate in the shared target directory, and each build would be taken
# for the other's; a binary would overwrite the repository's target/release/quire.
mutant_manifest() {
  awk '/^\[/ { skip = ($0 == "[[bin]]") } !skip' "$1" |
    sed -e '0,/^name = "quire"$/s//name = "quire-mutant"/' \
        -e '/^default-run = /d' \
        -e 's/^autotests = false$/autotests = false\nautobins = false\nautoexamples = false/' \
        -e 's/^\[lib\]$/[lib]\nname = "quire"/' \
        -e 's/^quire = { path = "\.",/quire = { package = "quire-mutant", path = ".",/'
}

# First the tree unchanged (the control: it must pass, or a "caught" below means
# nothing), then each mutant.
for patch in none "$root"/tools/sim-mutants/*.patch; do
  name=$(basename "$patch" .patch)
  if [ "$patch" != none ] && [ -n "${ONLY:-}" ] && [[ "$name" != *"$ONLY"* ]]; then continue; fi
  # One copy of the tree, refreshed for each mutant.
  dir="$scratch/tree"
  rm -rf "$dir"
  mkdir -p "$dir"
  # The tree as committed plus what is in the working copy, without target/ (copying
  # gives every file a new mtime, so cargo rebuilds the crate for each mutant).
  (cd "$root" && git ls-files -z --cached --others --exclude-standard) |
    (cd "$root" && xargs -0 cp --parents -t "$dir")
  mutant_manifest "$root/Cargo.toml" >"$dir/Cargo.toml"
  # The copy itself without debug info (its dependencies keep the release profile's, so
  # they are still shared): 7-18 s per mutant's build instead of 22-25 (three mutants,
  # built in turn on this 2-core VM). A failure is reported by its seed and message,
  # which need none.
  printf '\n[profile.release.package.quire-mutant]\ndebug = 0\n' >>"$dir/Cargo.toml"
  for expect in '^name = "quire-mutant"$' '^name = "quire"$' 'package = "quire-mutant"' '^autobins = false$'; do
    if ! grep -q "$expect" "$dir/Cargo.toml" || grep -q '^\[\[bin\]\]' "$dir/Cargo.toml"; then
      echo "Cargo.toml changed shape: tools/sim-mutants.sh cannot rename the copy ($expect)" >&2
      exit 1
    fi
  done
  if [ "$patch" = none ] && [ "${CONTROL:-1}" = 0 ]; then
    echo "== control: skipped (CONTROL=0: the unchanged tree's simulator run was done before)"
    continue
  fi
  if [ "$patch" = none ]; then
    echo "== control: the tree as it is"
    built=$SECONDS
    (cd "$dir" && cargo build -q --release --test sim 2>&1 | tail -5)
    echo "   built in $((SECONDS - built)) s"
    if ! out=$(cd "$dir" && cargo test -q --release --test sim -- --seeds "$seeds" --steps "$steps" 2>/dev/null); then
      echo "$out" | tail -3 | sed 's/^/   /'
      echo "   the unchanged tree fails: fix that first" >&2
      exit 1
    fi
    echo "   $(echo "$out" | tail -1)"
    if ! out=$(cd "$dir" && cargo test -q --release --test sim -- --cluster --seeds "$cluster_seeds" --steps "$cluster_steps" 2>/dev/null); then
      echo "$out" | tail -3 | sed 's/^/   /'
      echo "   the unchanged tree fails in the cluster world: fix that first" >&2
      exit 1
    fi
    echo "   $(echo "$out" | tail -1)"
    continue
  fi
  range=$seeds
  args=(--seeds "$seeds" --steps "$steps")
  if grep -q '^# world: cluster$' "$patch"; then
    range=$cluster_seeds
    args=(--cluster --seeds "$cluster_seeds" --steps "$cluster_steps")
  fi
  (cd "$dir" && patch -s -p1 < "$patch")
  echo "== $name: $(sed -n 's/^# //p' "$patch" | head -1)"
  # A mutant that does not build proves nothing (its patch is stale): say so, fail.
  built=$SECONDS
  if ! build=$(cd "$dir" && cargo build -q --release --test sim 2>&1); then
    echo "$build" | grep -E '^error' -A6 | head -20 | sed 's/^/   /'
    echo "   DOES NOT BUILD: update tools/sim-mutants/$name.patch"
    status=1
    continue
  fi
  echo "   built in $((SECONDS - built)) s"
  # (Caught or not is the question: no time spent minimising the failing run.)
  if out=$(cd "$dir" && cargo test -q --release --test sim -- "${args[@]}" --no-minimise 2>/dev/null); then
    echo "   NOT CAUGHT: ${args[*]}"
    status=1
  else
    # (A run that failed without a seed's line, a panic outside a seed, is caught too:
    # `|| true` keeps `set -e` from ending the script at the grep that finds nothing.)
    echo "$out" | { grep -E '^(cluster )?seed [0-9]+: FAILED|^replay:' || true; } | sed 's/^/   /'
    first=$(echo "$out" | sed -n 's/^\(cluster \)\{0,1\}seed \([0-9]*\): FAILED.*/\2/p' | head -1)
    start=${range%%..*}
    if [ -n "$first" ]; then
      echo "   caught at seed $first: $((first - start + 1)) seed(s) run"
    else
      echo "   caught (the run failed without a seed's FAILED line):"
      echo "$out" | tail -3 | sed 's/^/   /'
    fi
  fi
done
exit $status

#!/usr/bin/env bash
# Records `quire demo` at human pace as an asciinema v2 recording, docs/demo.cast (or
# the file given). The demo writes the recording itself (its hidden --cast option):
# asciinema is not needed to record, only to play it (`asciinema play docs/demo.cast`).
# About 30 s; everything it starts runs on this machine, in temporary directories.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs/demo.cast}"
mkdir -p "$(dirname "$out")"
cargo build --release --bin quire
# Recorded at 80 columns whatever this terminal is; colour even when stdout is not a
# terminal (the recording is played in one).
unset NO_COLOR
./target/release/quire demo --cast "$out.tmp" || { rm -f "$out.tmp"; exit 1; }
mv "$out.tmp" "$out"
events=$(($(wc -l <"$out") - 1))
seconds=$(tail -n 1 "$out" | sed -E 's/^\[([0-9.]+),.*/\1/')
echo "recorded $out: $events lines of output over ${seconds} s; play it with: asciinema play $out"

#!/usr/bin/env bash
# Bounded fuzz run of every target: FUZZ_SECONDS each (default 60). Needs a nightly toolchain
# and cargo-fuzz (`cargo install cargo-fuzz`); the corpus lives in fuzz/corpus (not committed).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-${1:-60}}"
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz: SKIPPED: no nightly toolchain (rustup toolchain install nightly)"; exit 0
fi
command -v cargo-fuzz >/dev/null || { echo "fuzz: cargo-fuzz missing (cargo install cargo-fuzz)"; exit 1; }
for target in $(cargo +nightly fuzz list); do
  log="$(mktemp)"
  if ! cargo +nightly fuzz run -O "$target" -- -max_total_time="$seconds" -rss_limit_mb=2048 >"$log" 2>&1; then
    grep -v '^#[0-9]' "$log" | grep -B2 -A6 -m1 'panicked' || true
    tail -40 "$log"; echo "fuzz: $target FAILED (artifact in tunnel-proto/fuzz/artifacts/$target)"; exit 1
  fi
  echo "fuzz: $target ran clean for ${seconds}s: $(grep -E '^Done [0-9]+ runs' "$log")"
  rm -f "$log"
done

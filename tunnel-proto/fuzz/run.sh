#!/usr/bin/env bash
# Bounded fuzz run of every target: FUZZ_SECONDS each (default 60). Needs a nightly toolchain
# and cargo-fuzz (`cargo install cargo-fuzz`); the corpus lives in fuzz/corpus (not committed).
# Without them it fails under CI=true (CI must fuzz); elsewhere it says SKIPPED, and records the
# skip in $TEST_SKIP_FILE when scripts/test.sh set one, so that no full pass is reported.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-${1:-60}}"
missing() {
  if [[ "${CI:-}" == true ]]; then echo "fuzz: FAILED: $* (CI=true: the fuzz run is required)"; exit 1; fi
  echo "fuzz: SKIPPED: $*"
  if [[ -n "${TEST_SKIP_FILE:-}" ]]; then echo "fuzz: $*" >>"$TEST_SKIP_FILE"; fi
  exit 0
}
rustup run nightly rustc --version >/dev/null 2>&1 ||
  missing "no nightly toolchain (rustup toolchain install nightly)"
command -v cargo-fuzz >/dev/null || missing "cargo-fuzz is not installed (cargo install cargo-fuzz)"
for target in $(cargo +nightly fuzz list); do
  log="$(mktemp)"
  if ! cargo +nightly fuzz run -O "$target" -- -max_total_time="$seconds" -rss_limit_mb=2048 >"$log" 2>&1; then
    grep -v '^#[0-9]' "$log" | grep -B2 -A6 -m1 'panicked' || true
    tail -40 "$log"; echo "fuzz: $target FAILED (artifact in tunnel-proto/fuzz/artifacts/$target)"; exit 1
  fi
  echo "fuzz: $target ran clean for ${seconds}s: $(grep -E '^Done [0-9]+ runs' "$log")"
  rm -f "$log"
done

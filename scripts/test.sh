#!/usr/bin/env bash
# Runs every test: formatting, the web console's build, lints, the Go interop peer build, the
# whole workspace's tests (unit, vectors, loopback, connector/acceptor, registry, interop against
# the real Go remotedialer, agents), the web console in headless Chromium, the deploy suite, the end-to-end suites behind NAT (tests/e2e/run.sh with
# a lone apiserver, tests/e2e/pods.sh with the agents as pods of a real two-node cluster), the kind
# suite (skips without kind) and a bounded fuzz run. Needs scripts/install-test-deps.sh first.
#
# A part that cannot run here says SKIPPED and records why in $TEST_SKIP_FILE; the last line is
# "all tests passed" only when nothing was skipped. The time of each step is printed at the end
# (with the install step's, when .ci/run passes CI_INSTALL_SECONDS).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
TEST_SKIP_FILE="$(mktemp)"
export TEST_SKIP_FILE

STEP_NAMES=() STEP_SECONDS=()
if [[ -n "${CI_INSTALL_SECONDS:-}" ]]; then
  STEP_NAMES+=("install (scripts/install-test-deps.sh)") STEP_SECONDS+=("$CI_INSTALL_SECONDS")
fi
step_started=""
T0=$SECONDS
end_step() {
  if [[ -n "$step_started" ]]; then STEP_SECONDS+=($((SECONDS - step_started))); fi
  step_started=""
}
step() {
  end_step
  printf '\n== %s (%s)\n' "$1" "$(date +%T)"
  STEP_NAMES+=("$1") step_started=$SECONDS
}
report() {
  local rc=$? i
  end_step
  printf '\n== step times\n'
  for i in "${!STEP_SECONDS[@]}"; do
    printf '%6ds  %s\n' "${STEP_SECONDS[$i]}" "${STEP_NAMES[$i]}"
  done
  printf '%6ds  total of scripts/test.sh\n' $((SECONDS - T0))
  if ((rc != 0)); then
    printf '\n== FAILED (exit %s) in: %s\n' "$rc" "${STEP_NAMES[-1]:-?}"
  elif [[ -s "$TEST_SKIP_FILE" ]]; then
    printf '\n== tests passed, but parts were SKIPPED (not a full pass):\n'
    sed 's/^/   SKIPPED: /' "$TEST_SKIP_FILE"
  else
    printf '\n== all tests passed (%s)\n' "$(date +%T)"
  fi
  rm -f "$TEST_SKIP_FILE"
}
trap report EXIT

step "cargo fmt --check"
cargo fmt --all -- --check
# Before anything compiles server-side: its build.rs embeds server-side/console/dist.
step "web console build (tsc + vite)"
(cd server-side/console && npm run --silent build)
step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
step "Go interop peer"
bash tests/interop/build.sh
step "cargo test --workspace"
cargo test --workspace --no-fail-fast
step "web console in headless Chromium: sign in, add a cluster, a real agent turns it Connected live, a non-admin's view, screenshots"
CONSOLE_SCREENSHOTS="${CONSOLE_SCREENSHOTS:-$PWD/target/console-browser}" \
  timeout 300 cargo test -p server-side --test console_browser -- --ignored --nocapture
echo "screenshots: ${CONSOLE_SCREENSHOTS:-$PWD/target/console-browser}"
step "deploy: images without a registry, manifests against a real kube-apiserver, agents under a real dockerd"
bash deploy/test/deploy-test.sh
step "e2e behind NAT: real kube-apiserver, kubectl, dockerd and docker CLI through the server, with faults"
cargo build -p server-side -p agent-cluster -p agent-node
E2E_BIN_DIR="$PWD/target/debug" bash tests/e2e/run.sh
step "e2e agents as pods: the import manifest in a real two-node cluster behind NAT; exec/attach/port-forward/cp/logs into pods; faults"
E2E_BIN_DIR="$PWD/target/debug" TPE2E_PREFIX=tpk E2E_STATE=/tmp/tpk bash tests/e2e/pods.sh
step "kind suite (skips, saying why, without kind and its node image)"
bash tests/kind/run.sh
step "fuzz (${FUZZ_SECONDS:=30} s per target)"
FUZZ_SECONDS="$FUZZ_SECONDS" tunnel-proto/fuzz/run.sh

#!/usr/bin/env bash
# Runs every test: formatting and lints, the Go interop peer build, the whole workspace's tests
# (unit, vectors, loopback, connector/acceptor, registry, interop against the real Go
# remotedialer, agents), the deploy suite, the end-to-end suite behind NAT (tests/e2e/run.sh), and
# a bounded fuzz run. Needs scripts/install-test-deps.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
step "Go interop peer"
bash tests/interop/build.sh
step "cargo test --workspace"
cargo test --workspace --no-fail-fast
step "deploy: images without a registry, manifests against a real kube-apiserver, agents under a real dockerd"
bash deploy/test/deploy-test.sh
step "e2e behind NAT: real kube-apiserver, kubectl, dockerd and docker CLI through the server, with faults"
cargo build -p server-side -p agent-cluster -p agent-node
E2E_BIN_DIR="$PWD/target/debug" bash tests/e2e/run.sh
step "kind suite (skips, saying why, without kind and its node image)"
bash tests/kind/run.sh
step "fuzz (${FUZZ_SECONDS:=30} s per target)"
FUZZ_SECONDS="$FUZZ_SECONDS" tunnel-proto/fuzz/run.sh
step "all tests passed"

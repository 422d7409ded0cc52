#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine (run as root): the Debian
# packages the tests start for real, the Go toolchain the interop peer needs (through Go's own
# toolchain download), the web console's npm packages, and cargo-fuzz. Idempotent: what is present is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  tinyproxy        # connector tests: a real HTTP CONNECT proxy
  docker.io        # node-agent tests: a real dockerd on its own socket
  busybox-static   # the image `docker import` makes for those tests
  iproute2 iptables socat curl tmux ca-certificates procps
  kubectl          # server tests: the real kubectl through the server
  python3-yaml jq openssl  # deploy tests: read manifests, query the API, make certificates
  containernetworking-plugins conntrack gcc libc6-dev  # the e2e cluster: pod networks, kube-proxy, the pause binary
  chromium         # the web console's browser test (driven by playwright-core: no browser download)
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install-test-deps: apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "install-test-deps: Debian packages present"
fi
# tinyproxy's package starts a system instance; the tests run their own on other ports.
systemctl disable --now tinyproxy >/dev/null 2>&1 || service tinyproxy stop >/dev/null 2>&1 || true

# The Go interop peer (real github.com/rancher/remotedialer); downloads modules and, if needed,
# the Go toolchain its go.mod asks for, through the Go module proxy.
bash tests/interop/build.sh

# The real kube-apiserver, etcd, kubectl, and the cluster's kube-controller-manager, kube-scheduler,
# kubelet, kube-proxy and cri-dockerd for the deploy and e2e suites, built from their Go modules
# once per machine (about 30 minutes the first time on 2 cores; cached in ~/.cache/tunnel-e2e).
bash tests/e2e/lib/build-k8s.sh

# The web console's toolchain (Vite, TypeScript, Preact, playwright-core) from the npm registry,
# exactly as server-side/console/package-lock.json pins it. Needs node >= 20.19 (Vite 8).
if ! node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>20||(a==20&&b>=19)?0:1)' 2>/dev/null; then
  echo "install-test-deps: node >= 20.19 is needed for the web console (found: $(node --version 2>/dev/null || echo none))" >&2
  exit 1
fi
echo "install-test-deps: npm ci (server-side/console)"
(cd server-side/console && npm ci --no-audit --no-fund --loglevel=error)

# Fuzzing needs nightly (present on these machines) and cargo-fuzz.
if rustup run nightly rustc --version >/dev/null 2>&1 && ! command -v cargo-fuzz >/dev/null; then
  echo "install-test-deps: cargo install cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi
echo "install-test-deps: done"

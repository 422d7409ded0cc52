#!/usr/bin/env bash
# Install the Debian packages the e2e suite needs. Idempotent: packages that
# are already installed are skipped, and `apt-get update` runs at most once
# per invocation (only when something is missing).
#
#   tests/e2e/lib/deps.sh            install what is missing
#   tests/e2e/lib/deps.sh --check    only report; exit 1 if something is missing
#   tests/e2e/lib/deps.sh --list     print the package list and exit
#
# Package services (docker, tinyproxy) are NOT started by the install: a
# temporary /usr/sbin/policy-rc.d forbids it; the suite starts its own
# private daemons (see dockerd.sh).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# package          why
PACKAGES=(
    docker.io        # dockerd + containerd + runc: the node agent's real Docker socket
    iproute2         # ip netns / veth: the NAT topology
    iptables         # MASQUERADE + FORWARD drop in the NAT router namespace
    nftables         # nft backend (iptables on Debian 12 is iptables-nft)
    tmux             # interactive `kubectl exec -it` / `docker exec -it` tests
    busybox-static   # root filesystem of the test container image
    curl             # HTTP probes
    socat            # TCP listeners/clients in namespaces, CONNECT tests
    tinyproxy        # HTTP CONNECT proxy for the agents' proxy support test
    openssl          # CA and certificates for kube-apiserver / the server
    ca-certificates
    procps           # ps / pgrep for diagnostics
    jq               # JSON from go mod download / kubectl
    python3          # free-port helper, small test servers
    xz-utils         # busybox-image / tarballs
)

mode="install"
case "${1:-}" in
    --check) mode="check" ;;
    --list)  printf '%s\n' "${PACKAGES[@]}"; exit 0 ;;
    ""|install) ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (use --check or --list)" ;;
esac

installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" == "installed" ]]
}

step "checking ${#PACKAGES[@]} packages"
missing=()
for p in "${PACKAGES[@]}"; do
    if installed "$p"; then
        info "present  $p ($(dpkg-query -W -f='${Version}' "$p"))"
    else
        info "MISSING  $p"
        missing+=("$p")
    fi
done

if ((${#missing[@]} == 0)); then
    ok "all packages present, nothing to do"
    exit 0
fi
if [[ "$mode" == check ]]; then
    die "missing: ${missing[*]}"
fi
need_root

# Keep package postinst scripts from starting system daemons (docker,
# containerd, tinyproxy): exit code 101 = "action forbidden" (invoke-rc.d).
policy=/usr/sbin/policy-rc.d
policy_ours=0
if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    policy_ours=1
    trap '[[ $policy_ours == 1 ]] && rm -f "$policy"' EXIT
fi

export DEBIAN_FRONTEND=noninteractive
step "apt-get update (once)"
t0=$SECONDS
timeout 600 apt-get update -q
ok "apt-get update took $((SECONDS - t0))s"

step "apt-get install ${missing[*]}"
t0=$SECONDS
timeout 1200 apt-get install -y -q --no-install-recommends "${missing[@]}"
ok "installed ${#missing[@]} package(s) in $((SECONDS - t0))s: ${missing[*]}"

step "verifying"
for p in "${missing[@]}"; do
    installed "$p" || die "package $p still not installed"
done
for c in dockerd containerd runc ip iptables nft tmux busybox curl socat tinyproxy openssl jq; do
    if command -v "$c" >/dev/null 2>&1; then info "$c -> $(command -v "$c")"; else die "command $c not found after install"; fi
done
ok "dependencies ready"

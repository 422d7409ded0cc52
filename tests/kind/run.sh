#!/usr/bin/env bash
# The deploy/ manifests in a real cluster: kind creates one, the images from
# deploy/images/build.sh are loaded into it, the server is deployed with `kubectl apply -k
# deploy/server`, a cluster is added with the server's CLI (`kubectl exec`), its import manifest
# is applied, and then: the cluster agent's Deployment rolls out (its readiness probe is the
# tunnel), the server shows the cluster connected, and kubectl works through the server
# (whoami as the impersonated user, get pods, logs of the agent's pod through the tunnel).
#
#   tests/kind/run.sh
#
# Needs: kind, a Docker daemon kind can use (DOCKER_HOST or the default socket), kubectl, curl,
# jq, and the kind node image already in that Docker (KIND_NODE_IMAGE, default below): this suite
# never pulls. Without kind, the daemon or the image it prints one line saying which and exits 0
# (skipped), so it can sit in scripts/test.sh.
#
# Environment: KIND_NODE_IMAGE, IMAGE_PROFILE (release: build.sh --profile), BUILD_CARGO
# (build.sh --cargo, auto), KIND_KEEP=1 (keep the cluster; delete it with
# `kind delete cluster --name NAME`), KIND_TIMEOUT (seconds per wait, default 180).
#
# The node-agent DaemonSet is not applied: kind nodes run containerd and have no Docker socket
# (deploy/test/deploy-test.sh runs the node agent under a real dockerd instead).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

KIND_NODE_IMAGE="${KIND_NODE_IMAGE:-kindest/node:v1.33.1}"
PROFILE="${IMAGE_PROFILE:-release}"
WAIT="${KIND_TIMEOUT:-180}"
NAME="tunnel-kind-$$"
CLUSTER_NAME=kind-e2e

skip() {
    printf 'tests/kind: SKIPPED: %s\n' "$*"
    if [[ -n "${TEST_SKIP_FILE:-}" ]]; then echo "kind suite: $*" >>"$TEST_SKIP_FILE"; fi
    exit 0
}
log() { printf '[kind] %s\n' "$*"; }
die() { printf '[kind] FAIL %s\n' "$*" >&2; exit 1; }

# --- can it run here? One line and exit 0 when not.
command -v kind >/dev/null 2>&1 ||
    skip "'kind' is not installed (install kind and load its node image $KIND_NODE_IMAGE into Docker; see deploy/README.md)"
command -v docker >/dev/null 2>&1 || skip "no docker CLI for kind"
timeout 10 docker version >/dev/null 2>&1 || skip "no Docker daemon answers at ${DOCKER_HOST:-the default socket}; kind needs one"
docker image inspect "$KIND_NODE_IMAGE" >/dev/null 2>&1 ||
    skip "the kind node image $KIND_NODE_IMAGE is not in the local Docker and this suite does not pull (docker pull it where a registry is reachable, or set KIND_NODE_IMAGE)"
for c in kubectl curl jq python3; do command -v "$c" >/dev/null 2>&1 || die "'$c' not found"; done

STATE="$(mktemp -d /tmp/tunnel-kind.XXXXXX)"
export KUBECONFIG="$STATE/kind.kubeconfig"
PF_PID=""
cleanup() {
    local rc=$?
    set +e
    [[ -n "$PF_PID" ]] && kill "$PF_PID" 2>/dev/null
    if ((rc != 0)) && [[ -s "$KUBECONFIG" ]]; then
        log "--- state at failure"
        kubectl get pods -A -o wide 2>&1 | sed 's/^/    /'
        kubectl -n tunnel-system logs deploy/tunnel-server --tail 30 2>&1 | sed 's/^/    server: /'
        kubectl -n cattle-system logs deploy/cattle-cluster-agent --tail 30 2>&1 | sed 's/^/    agent: /'
    fi
    if [[ "${KIND_KEEP:-0}" == 1 ]]; then
        log "kept: kind cluster $NAME (KUBECONFIG=$KUBECONFIG); delete: kind delete cluster --name $NAME"
    else
        kind delete cluster --name "$NAME" >/dev/null 2>&1
        rm -rf "$STATE"
    fi
    if ((rc == 0)); then echo "tests/kind: 1 passed, 0 failed"; else echo "tests/kind: 0 passed, 1 failed"; fi
    exit "$rc"
}
trap cleanup EXIT

# wait_until SECONDS WHAT CMD...: bounded poll.
wait_until() {
    local secs="$1" what="$2" deadline; shift 2
    deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "timed out after ${secs}s: $what"
        sleep 2
    done
}

log "1. kind cluster $NAME ($KIND_NODE_IMAGE)"
kind create cluster --name "$NAME" --image "$KIND_NODE_IMAGE" --kubeconfig "$KUBECONFIG" --wait "${WAIT}s"

log "2. images: deploy/images/build.sh --profile $PROFILE, then kind load"
"$repo/deploy/images/build.sh" --profile "$PROFILE" --cargo "${BUILD_CARGO:-auto}" tunnel-server cattle-cluster-agent
for n in tunnel-server cattle-cluster-agent; do
    kind load docker-image --name "$NAME" "tunnel-project/$n:dev"
done

log "3. server: kubectl apply -k deploy/server"
kubectl apply -k "$repo/deploy/server"
kubectl -n tunnel-system rollout status deploy/tunnel-server --timeout="${WAIT}s"
srv() { kubectl -n tunnel-system exec deploy/tunnel-server -- tunnel-server "$@"; }
out="$(srv cluster add "$CLUSTER_NAME")"
import_url="$(sed -n 's/^ *kubectl apply -f //p' <<<"$out")"
[[ "$import_url" == https://tunnel-server.tunnel-system.svc:8443/v3/import/*.yaml ]] || die "import command: $out"
file="${import_url##*/}"; file="${file%.yaml}"; CLUSTER_ID="${file##*_}"
ADMIN_TOKEN="$(srv user add admin --admin | sed -n 's/^API token (shown once): //p')"
[[ -n "$ADMIN_TOKEN" ]] || die "no admin token"
log "   cluster $CLUSTER_ID, import URL $import_url"

# The server from this machine: a port-forward to its Service (the serving certificate covers
# 127.0.0.1 as well as the Service name).
PF_PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
kubectl -n tunnel-system port-forward svc/tunnel-server "$PF_PORT:8443" >"$STATE/port-forward.log" 2>&1 &
PF_PID=$!
wait_until 30 "port-forward to the server" curl -ksf "https://127.0.0.1:$PF_PORT/ping"
curl -ksf "https://127.0.0.1:$PF_PORT/cacerts" >"$STATE/ca.pem"
api() { curl -sf --cacert "$STATE/ca.pem" -H "Authorization: Bearer $ADMIN_TOKEN" "https://127.0.0.1:$PF_PORT$1"; }

log "4. import: the manifest from the import URL, kubectl apply"
curl -sf --cacert "$STATE/ca.pem" "https://127.0.0.1:$PF_PORT/v3/import/$file.yaml" -o "$STATE/import.yaml"
kubectl apply -f "$STATE/import.yaml"
kubectl -n cattle-system rollout status deploy/cattle-cluster-agent --timeout="${WAIT}s"
wait_until "$WAIT" "cluster $CLUSTER_ID connected" bash -c \
    "curl -sf --cacert '$STATE/ca.pem' -H 'Authorization: Bearer $ADMIN_TOKEN' https://127.0.0.1:$PF_PORT/v1/clusters/$CLUSTER_ID | jq -e .connected"
log "   $(api "/v1/clusters/$CLUSTER_ID" | jq -c '{id, apiEndpoint, tunnel, aggregationTunnel, connected}')"

log "5. kubectl through the server"
# The server impersonates its user "admin" downstream.
kubectl create clusterrolebinding tunnel-kind-admin --clusterrole=cluster-admin --user=admin
srv kubeconfig "$CLUSTER_NAME" --user admin --server-url "https://127.0.0.1:$PF_PORT" >"$STATE/through.kubeconfig"
kt() { timeout 60 kubectl --kubeconfig "$STATE/through.kubeconfig" "$@"; }
who="$(kt auth whoami -o jsonpath='{.status.userInfo.username}')"
[[ "$who" == admin ]] || die "whoami through the server: '$who'"
kt -n cattle-system get pods -o wide
pod="$(kt -n cattle-system get pods -l app=cattle-cluster-agent -o jsonpath='{.items[0].metadata.name}')"
kt -n cattle-system logs "$pod" --tail 3
kt -n cattle-system get secret stv-aggregation -o name
log "   OK: Connected, kubectl (whoami=admin, get, logs) through tunnel-server"

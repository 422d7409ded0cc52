#!/usr/bin/env bash
# shellcheck disable=SC2034  # AGENT_REPO, KC_ARGV, WORKER, NODE_AGENTS, ...: read by the sourced steps
# The agents as pods in a kind cluster (issue 14, point 6): the steps of tests/e2e/pods.sh, run
# against a kind cluster (a control-plane and a worker node: docker containers running
# containerd). The steps are not copies: this script sources tests/e2e/suite-lib.sh,
# tests/e2e/pods-steps.sh and tests/e2e/pods-stream-steps.sh and calls the functions pods.sh
# calls, through the interface documented at the top of those two files.
#
#   tests/kind/run.sh
#
# Steps: kind creates the cluster (`kind create cluster --config`, the server's NodePort mapped
# to a free port on 127.0.0.1 only); deploy/images/build.sh makes the tunnel-server and
# cattle-cluster-agent images (no registry) and tests/e2e/lib/busybox-image.sh a busybox image,
# all loaded with `kind load docker-image`; the server is deployed with `kubectl apply -k` of
# deploy/server through an overlay in the work directory with two kind-only patches: the
# Service's type NodePort, and the pod on the control-plane node (stopping the worker's kubelet
# must not take the server's endpoint away; the PVC binds on the node of the first pod, so this
# cannot be patched in afterwards). `cluster add`, `user add`, `grant`, `kubeconfig` with the
# server's CLI (`kubectl exec`). Then the shared steps:
#   pods_import      the operator's `curl <import URL> | kubectl apply -f -`, rollout, Connected
#   pods_workload    get nodes, a Deployment scaled 1 -> 3 -> 1 under get pods -w, describe,
#                    events, logs, all through the server
#   pods_streaming   exec -it (both protocols) in tmux, exec -i to stdin's end, attach/detach,
#                    port-forward (64 MiB, 20 connections), cp, logs -f, run --rm -it, debug,
#                    RBAC on exec, audit lines and metrics
#   faults           fault_delete_cluster_agent, fault_rolling_update (1 replica),
#                    fault_scale_two, fault_delete_cluster_agent, fault_rolling_update
#                    (2 replicas), fault_kubelet (`docker exec NODE systemctl stop kubelet` on
#                    the worker for PODS_KUBELET_STOP s)
# and a last check: Connected, agent pods Ready, `kubectl auth whoami` through the server.
#
# No node agents here (NODE_AGENTS=0 for the shared steps): kind nodes run containerd and have no
# Docker socket for the DaemonSet cattle-node-agent to serve. So the import is without
# ?nodeAgent=true, there is no DaemonSet rollout and no nodes-connected wait, the rolling update
# leaves the node agent alone, fault_delete_node_agent is not called, and nothing goes to docker
# through the server. tests/e2e/pods.sh runs all of that against real dockerds, and
# deploy/test/deploy-test.sh runs the node agent's image as its DaemonSet describes it.
#
# The management host is this machine: kubectl as the server's users, curl to the server at
# https://127.0.0.1:PORT (the NodePort; the serving certificate covers 127.0.0.1). The operator
# runs here too, with the kind cluster's admin kubeconfig; the import command names the server's
# in-cluster URL (the ConfigMap's server-url, the address the agents dial), which the operator's
# curl reaches at the same 127.0.0.1 port (`connect-to` in its .curlrc).
#
# Needs: kind, a Docker daemon kind can use (DOCKER_HOST or the current docker context; a unix
# socket, for busybox-image.sh), the kind node image already in it (KIND_NODE_IMAGE, default
# below: this suite never pulls), kubectl (within the version skew of the node image), curl, jq,
# python3, tmux, busybox-static, and cargo when build.sh finds the binaries missing or stale.
# Without kind, the daemon or the node image it prints one line `tests/kind: SKIPPED: <why>`,
# appends the reason to $TEST_SKIP_FILE when set, and exits 0, so it can sit in scripts/test.sh.
#
# Environment: KIND_NODE_IMAGE, IMAGE_PROFILE (release: build.sh --profile), BUILD_CARGO
# (build.sh --cargo, auto), KIND_KEEP=1 (keep the cluster and the work directory; delete with
# `kind delete cluster --name NAME`), KIND_TIMEOUT (seconds for the cluster and the server to
# come up, default 180), PODS_KUBELET_STOP (seconds the worker's kubelet is stopped, default 60).
# Every wait is bounded; traffic goes to 127.0.0.1 and inside the kind cluster only. The EXIT trap
# stops what this script started (by pid) and deletes the kind cluster, whether the run passed or
# not.
set -Eeuo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
KIND_NODE_IMAGE="${KIND_NODE_IMAGE:-kindest/node:v1.33.1}"

# --- can it run here? One line and exit 0 when not, before anything is created.
skip_suite() {
    printf 'tests/kind: SKIPPED: %s\n' "$*"
    if [[ -n "${TEST_SKIP_FILE:-}" ]]; then echo "kind suite: $*" >>"$TEST_SKIP_FILE"; fi
    exit 0
}
command -v kind >/dev/null 2>&1 ||
    skip_suite "'kind' is not installed (install kind and load its node image $KIND_NODE_IMAGE into Docker; see deploy/README.md)"
command -v docker >/dev/null 2>&1 || skip_suite "no docker CLI for kind"
timeout 10 docker version >/dev/null 2>&1 || skip_suite "no Docker daemon answers at ${DOCKER_HOST:-the default socket}; kind needs one"
timeout 30 docker image inspect "$KIND_NODE_IMAGE" >/dev/null 2>&1 ||
    skip_suite "the kind node image $KIND_NODE_IMAGE is not in the local Docker and this suite does not pull (docker pull it where a registry is reachable, or set KIND_NODE_IMAGE)"

L="$REPO/tests/e2e/lib"
# shellcheck source=../e2e/lib/common.sh
. "$L/common.sh"
_tpe2e_name=kind
# shellcheck source=../e2e/suite-lib.sh
. "$REPO/tests/e2e/suite-lib.sh"
# shellcheck source=../e2e/pods-steps.sh
. "$REPO/tests/e2e/pods-steps.sh"
# shellcheck source=../e2e/pods-stream-steps.sh
. "$REPO/tests/e2e/pods-stream-steps.sh"

NAME="tunnel-kind-$$"
PROFILE="${IMAGE_PROFILE:-release}"
WAIT="${KIND_TIMEOUT:-180}"
KUBELET_STOP="${PODS_KUBELET_STOP:-60}"
NODE_AGENTS=0
NODE_PORT=30443
AGENT_REPO=tunnel-project
AGENT_TAG=dev                       # the tag deploy/server/base/configmap.yaml renders
BUSYBOX_IMAGE=tpe2e/busybox:latest
SUSER=ops
CLUSTER_NAME=kind-downstream
TMUX_SOCK="tunnel-kind-$$"
# Our own traffic is to 127.0.0.1 only; a proxy from the environment stays for cargo and kind.
export NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}" no_proxy="127.0.0.1,localhost${no_proxy:+,$no_proxy}"
unset KUBECONFIG

W=""
KIND_STARTED=0

cleanup() {
    local rc=$?
    cleanup_begin "$rc" || return 0
    if [[ $rc != 0 && -n "$W" && -d "$W/logs" ]]; then
        echo
        warn "suite FAILED (exit $rc) at ${FAILED_STEP:-step $STEP_NO ($STEP_TITLE)}"
        if ((KIND_STARTED)) && [[ -s "$KIND_KUBECONFIG" ]]; then
            timeout 30 "$KUBECTL" --kubeconfig "$KIND_KUBECONFIG" get pods -A -o wide >"$W/logs/pods.txt" 2>&1
            timeout 30 "$KUBECTL" --kubeconfig "$KIND_KUBECONFIG" get events -A --sort-by=.lastTimestamp 2>&1 | tail -n 40 >"$W/logs/events.txt"
            timeout 30 "$KUBECTL" --kubeconfig "$KIND_KUBECONFIG" -n tunnel-system logs deploy/tunnel-server --tail 40 >"$W/logs/tunnel-server.log" 2>&1
            local p
            for p in $(timeout 30 "$KUBECTL" --kubeconfig "$KIND_KUBECONFIG" -n cattle-system get pods -o name 2>/dev/null); do
                timeout 30 "$KUBECTL" --kubeconfig "$KIND_KUBECONFIG" -n cattle-system logs "$p" --tail 40 >"$W/logs/${p#pod/}.log" 2>&1
            done
        fi
        local f
        for f in "$W"/logs/*; do
            [[ -s "$f" ]] || continue
            printf '\n----- last lines of %s -----\n' "$f" >&2
            tail -n 20 "$f" >&2
        done
    fi
    printf '\n[e2e %7.1fs] ======== teardown ========\n' "$(since "$E2E_T0")"
    tmux -L "$TMUX_SOCK" kill-server 2>/dev/null
    local t0; t0="$(now)"
    if [[ -n "$W" && -d "$W/pids" ]]; then
        local pf
        for pf in "$W"/pids/*.pid; do
            [[ -e "$pf" ]] || continue
            stop_bg "$(basename "$pf" .pid)" TERM 5
        done
    fi
    if [[ "${KIND_KEEP:-0}" == 1 ]]; then
        info "KIND_KEEP=1: kind cluster $NAME and $W kept (kubeconfig $W/kind.kubeconfig); delete with: kind delete cluster --name $NAME; rm -rf $W"
    else
        if ((KIND_STARTED)); then
            info "kind delete cluster --name $NAME"
            timeout 180 kind delete cluster --name "$NAME" --kubeconfig "$KIND_KUBECONFIG" 2>&1 | indent
        fi
        [[ -z "$W" || ! -d "$W" ]] || rm -rf "$W"
    fi
    info "teardown took $(since "$t0")s"
    suite_report "$rc"
    if [[ $rc == 0 ]]; then echo "tests/kind: 1 passed, 0 failed"; else echo "tests/kind: 0 passed, 1 failed"; fi
    exit "$rc"
}
suite_traps cleanup

# === the suite's side of the pods-steps.sh / pods-stream-steps.sh interface ===
# The management host is this machine: suite-lib's inm ("in the management namespace") runs the
# command here, so suite-lib's kc, sc, api, metrics and metric work as they are (kc: $KUBECTL with
# $W/USER.kubeconfig; sc/api: curl to $SERVER_URL trusting $W/server/ca.pem).
inm() { "$@"; }
on_mgmt() { "$@"; }
kd() { "$KUBECTL" --kubeconfig "$KIND_KUBECONFIG" "$@"; }
# ts: the server's CLI in its pod. A kubeconfig names the address this host reaches the server at
# (the ConfigMap's server-url is the in-cluster one the agents dial).
ts() {
    if [[ "${1:-}" == kubeconfig ]]; then set -- "$@" --server-url "$SERVER_URL"; fi
    timeout 60 "$KUBECTL" --kubeconfig "$KIND_KUBECONFIG" -n tunnel-system exec deploy/tunnel-server -- tunnel-server "$@"
}
server_log() { timeout 60 "$KUBECTL" --kubeconfig "$KIND_KUBECONFIG" -n tunnel-system logs deploy/tunnel-server; }
# downstream_sh: the operator, here, with the kind cluster's admin kubeconfig; its curl reaches the
# import URL's in-cluster host at the NodePort on 127.0.0.1 ($W/down-home/.curlrc).
downstream_sh() {
    env -i PATH="$W/down-bin:/usr/bin:/bin" HOME="$W/down-home" KUBECONFIG="$KIND_KUBECONFIG" \
        DOWN_CA="$W/down-home/ca.pem" bash -c "set -o pipefail; $1"
}
dk_argv() { fail "dk_argv: the kind suite runs no node agents (NODE_AGENTS=0), so no docker through the server"; }
# images_tag FROM TO: tagged in this Docker and loaded into every kind node.
images_tag() {
    docker tag "$1" "$2"
    timeout 300 kind load docker-image --name "$NAME" "$2" 2>&1 | indent
}
kc_cmdline() {
    local user="$1"; shift
    printf '%q ' env -i PATH=/usr/bin:/bin HOME="$W/home" TERM=xterm KUBECONFIG="$W/$user.kubeconfig" "$@" "$KUBECTL"
}
# kind nodes are docker containers running systemd; the kubelet is a unit there.
kubelet_stop() { timeout 60 docker exec "$1" systemctl stop kubelet && echo "OK kubelet stopped on $1 (docker exec $1 systemctl stop kubelet)"; }
kubelet_start() { timeout 60 docker exec "$1" systemctl start kubelet && echo "OK kubelet started on $1"; }

# =====================================================================================
part "Part 0: prerequisites"
# =====================================================================================

step "prerequisites: tools, the Docker socket for the busybox image, the work directory"
need_cmd kubectl curl jq python3 tmux awk setsid sha256sum realpath
KUBECTL="$(command -v kubectl)"
DOCKER_ENDPOINT="${DOCKER_HOST:-$(docker context inspect --format '{{.Endpoints.docker.Host}}' 2>/dev/null || true)}"
DOCKER_ENDPOINT="${DOCKER_ENDPOINT:-unix:///var/run/docker.sock}"
[[ "$DOCKER_ENDPOINT" == unix://* && -S "${DOCKER_ENDPOINT#unix://}" ]] ||
    fail "the Docker daemon is at $DOCKER_ENDPOINT: tests/e2e/lib/busybox-image.sh needs its unix socket"
W="$(mktemp -d /tmp/tunnel-kind.XXXXXX)"
mkdir -p "$W/pids" "$W/logs" "$W/home" "$W/server" "$W/down-bin" "$W/down-home" "$W/server-kind"
KIND_KUBECONFIG="$W/kind.kubeconfig"
ln -s "$KUBECTL" "$W/down-bin/kubectl"
ln -s "$(command -v curl)" "$W/down-bin/curl"
info "kind $(kind version 2>&1 | head -n 1); kubectl $("$KUBECTL" version --client -o json 2>/dev/null | jq -r .clientVersion.gitVersion); docker at $DOCKER_ENDPOINT; work directory $W"
ok "ready"

# =====================================================================================
part "Part 1: the kind cluster and the images"
# =====================================================================================

step "kind create cluster $NAME: a control-plane and a worker node ($KIND_NODE_IMAGE), NodePort $NODE_PORT on 127.0.0.1"
HOST_PORT="$(free_port 127.0.0.1)"
cat >"$W/kind.yaml" <<EOF
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
- role: control-plane
  extraPortMappings:
  - {containerPort: $NODE_PORT, hostPort: $HOST_PORT, listenAddress: "127.0.0.1", protocol: TCP}
- role: worker
EOF
t0="$(now)"
KIND_STARTED=1
timeout $((WAIT + 300)) kind create cluster --name "$NAME" --image "$KIND_NODE_IMAGE" --config "$W/kind.yaml" \
    --kubeconfig "$KIND_KUBECONFIG" --wait "${WAIT}s" >"$W/logs/kind-create.log" 2>&1 ||
    { tail -n 30 "$W/logs/kind-create.log" >&2; fail "kind create cluster failed"; }
indent <"$W/logs/kind-create.log"
kd wait --for=condition=Ready nodes --all --timeout="${WAIT}s" 2>&1 | indent || fail "the kind nodes are not Ready"
mapfile -t NODES < <(kd get nodes -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')
WORKER="$(kd get nodes -l '!node-role.kubernetes.io/control-plane' -o jsonpath='{.items[0].metadata.name}')"
CP_NODE="$(kd get nodes -l node-role.kubernetes.io/control-plane -o jsonpath='{.items[0].metadata.name}')"
[[ ${#NODES[@]} == 2 && -n "$WORKER" && -n "$CP_NODE" ]] || fail "unexpected nodes: ${NODES[*]}"
kd get nodes -o wide 2>&1 | indent
result "kind create cluster (2 nodes Ready)" "$(since "$t0")s"
ok "nodes ${NODES[*]} Ready in $(since "$t0")s (worker: $WORKER)"

step "images: deploy/images/build.sh --profile $PROFILE (tunnel-server, cattle-cluster-agent :$AGENT_TAG), busybox-image.sh, kind load docker-image"
t0="$(now)"
"$REPO/deploy/images/build.sh" --profile "$PROFILE" --cargo "${BUILD_CARGO:-auto}" --tag "$AGENT_TAG" --repo "$AGENT_REPO" \
    tunnel-server cattle-cluster-agent 2>&1 | indent || fail "deploy/images/build.sh failed"
"$L/busybox-image.sh" "$DOCKER_ENDPOINT" "$BUSYBOX_IMAGE" 2>&1 | indent || fail "busybox-image.sh failed"
for img in "$AGENT_REPO/tunnel-server:$AGENT_TAG" "$AGENT_REPO/cattle-cluster-agent:$AGENT_TAG" "$BUSYBOX_IMAGE"; do
    timeout 300 kind load docker-image --name "$NAME" "$img" 2>&1 | indent || fail "kind load docker-image $img failed"
done
for n in "${NODES[@]}"; do
    info "$n: $(timeout 30 docker exec "$n" crictl images 2>/dev/null | awk -v r="$AGENT_REPO/|tpe2e/" '$1 ~ r { printf "%s:%s ", $1, $2 }')"
done
result "images built and loaded" "$(since "$t0")s"
ok "images in both nodes in $(since "$t0")s"

# =====================================================================================
part "Part 2: the server in the cluster, the import"
# =====================================================================================

step "the server: kubectl apply -k deploy/server, with a kind overlay (Service NodePort $NODE_PORT, pod on $CP_NODE)"
cat >"$W/server-kind/kustomization.yaml" <<EOF
# deploy/server as it is, plus what the kind suite needs: the server reachable from this machine
# (NodePort, mapped by kind to 127.0.0.1:$HOST_PORT) and on the control-plane node, whose kubelet
# the suite never stops.
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
- $(realpath --relative-to="$W/server-kind" "$REPO/deploy/server")
patches:
- target: {kind: Deployment, name: tunnel-server}
  patch: |-
    - op: add
      path: /spec/template/spec/nodeSelector
      value: {node-role.kubernetes.io/control-plane: ""}
    - op: add
      path: /spec/template/spec/tolerations
      value: [{key: node-role.kubernetes.io/control-plane, operator: Exists, effect: NoSchedule}]
- target: {kind: Service, name: tunnel-server}
  patch: |-
    - op: add
      path: /spec/type
      value: NodePort
    - op: add
      path: /spec/ports/0/nodePort
      value: $NODE_PORT
EOF
t0="$(now)"
kd apply -k "$W/server-kind" 2>&1 | indent || fail "kubectl apply -k failed"
kd -n tunnel-system rollout status deployment/tunnel-server --timeout="${WAIT}s" 2>&1 | indent || fail "the server's Deployment did not roll out"
kd -n tunnel-system get pods -o wide 2>&1 | indent
SERVER_URL="https://127.0.0.1:$HOST_PORT"
wait_until 60 "the server's /ping at $SERVER_URL" curl -ksf --max-time 2 "$SERVER_URL/ping" || fail "the server does not answer at $SERVER_URL"
curl -ksf --max-time 5 "$SERVER_URL/cacerts" >"$W/server/ca.pem" || fail "no /cacerts"
[[ "$(sc --max-time 5 "$SERVER_URL/ping")" == pong ]] || fail "the server's certificate does not verify with its /cacerts for 127.0.0.1"
SERVER_URL_IN_CLUSTER="$(kd -n tunnel-system get configmap tunnel-server -o json | jq -r '.data["server-url"]')"
in_cluster_hostport="${SERVER_URL_IN_CLUSTER#https://}"; in_cluster_hostport="${in_cluster_hostport%%/*}"
printf 'connect-to = "%s:127.0.0.1:%s"\n' "$in_cluster_hostport" "$HOST_PORT" >"$W/down-home/.curlrc"
cp "$W/server/ca.pem" "$W/down-home/ca.pem"
result "server rolled out and answering on 127.0.0.1" "$(since "$t0")s"
ok "the server answers at $SERVER_URL (NodePort $NODE_PORT); agents dial $SERVER_URL_IN_CLUSTER"

step "tunnel-server cluster add / user add / grant / kubeconfig (kubectl exec); the downstream RBAC for the user"
ts cluster add "$CLUSTER_NAME" >"$W/cluster-add.out"
indent <"$W/cluster-add.out"
CLUSTER_ID="$(sed -n 's/^cluster .* created as \([^ ]*\)$/\1/p' "$W/cluster-add.out")"
IMPORT_URL="$(awk '/kubectl apply -f/ {print $NF}' "$W/cluster-add.out")"
[[ -n "$CLUSTER_ID" && "$IMPORT_URL" == "$SERVER_URL_IN_CLUSTER/v3/import/"* ]] || fail "unexpected 'cluster add' output"
ts user add pods-admin --admin >"$W/user-admin.out"
ADMIN_TOKEN="$(sed -n 's/^API token (shown once): //p' "$W/user-admin.out")"
ts user add "$SUSER" >"$W/user-$SUSER.out"
[[ -n "$ADMIN_TOKEN" && -n "$(sed -n 's/^API token (shown once): //p' "$W/user-$SUSER.out")" ]] || fail "no API token from 'user add'"
ts grant "$SUSER" "$CLUSTER_NAME" | indent
ts kubeconfig "$CLUSTER_NAME" --user "$SUSER" >"$W/$SUSER.kubeconfig"
chmod 600 "$W/$SUSER.kubeconfig"
KC_ARGV=(env -i PATH=/usr/bin:/bin HOME="$W/home" KUBECONFIG="$W/$SUSER.kubeconfig" "$KUBECTL")
info "$SUSER.kubeconfig server: $(awk '/server:/ {print $2}' "$W/$SUSER.kubeconfig")"
kd create clusterrolebinding pods-ops-cluster-admin --clusterrole=cluster-admin --user="$SUSER" 2>&1 | indent
ok "cluster $CLUSTER_ID; user $SUSER (granted, cluster-admin downstream through impersonation)"

pods_import
result "import: Deployment rolled out (from the apply)" "${T_ROLLOUT_DEPLOY}s"
result "import: Connected (from the apply)" "${T_CONNECTED}s"

# =====================================================================================
part "Part 3: kubectl through the server"
# =====================================================================================
pods_workload

# =====================================================================================
part "Part 3b: streams into pods (exec -it, attach, port-forward, cp, logs -f, run, debug)"
# =====================================================================================
pods_streaming

# =====================================================================================
part "Part 4: faults with pods"
# =====================================================================================

fault_delete_cluster_agent
result "cluster agent pod deleted (1 replica): not Connected" "${NOT_CONNECTED}s (slowest kubectl $(probe_max kprobe)s)"
fault_rolling_update pods2
result "rolling update to :pods2 (1 replica): not Connected" "${NOT_CONNECTED}s"
fault_scale_two
fault_delete_cluster_agent
result "cluster agent pod deleted (2 replicas): not Connected" "${NOT_CONNECTED}s (slowest kubectl $(probe_max kprobe)s)"
fault_rolling_update pods3
result "rolling update to :pods3 (2 replicas): not Connected" "${NOT_CONNECTED}s"
info "not run here: fault_delete_node_agent (NODE_AGENTS=0: kind nodes have no Docker socket; tests/e2e/pods.sh runs it)"
fault_kubelet "$WORKER" "" "$KUBELET_STOP"
result "kubelet of $WORKER stopped ${KUBELET_STOP}s: NotReady seen at" "+${T_NOTREADY:-never}s"

step "steady state after the faults: Connected, agent pods Ready, kubectl auth whoami through the server"
wait_until 30 "Connected" probe_connected || true
api "/v1/clusters/$CLUSTER_ID" | jq -c '{id, tunnel, aggregationTunnel, connected}' | indent
[[ "$(api "/v1/clusters/$CLUSTER_ID" | jq -r .connected)" == true ]] || fail "cluster not Connected"
kd -n cattle-system wait --for=condition=Ready pods --all --timeout=60s 2>&1 | indent || fail "agent pods not Ready again"
kc "$SUSER" -n cattle-system get pods -o wide 2>&1 | indent
who="$(kc "$SUSER" auth whoami -o jsonpath='{.status.userInfo.username}')"
[[ "$who" == "$SUSER" ]] || fail "kubectl auth whoami through the server: '$who', not the impersonated $SUSER"
info "server: $(metric tunnel_server_sessions) sessions, $(metric tunnel_server_streams) streams"
ok "Connected, agent pods Ready, whoami through the server = $who"

part "done"

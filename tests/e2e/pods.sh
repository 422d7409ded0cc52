#!/usr/bin/env bash
# shellcheck disable=SC2034  # BUSYBOX_IMAGE, KC_ARGV, WORKER, ...: read by the sourced pods-steps.sh
# The agents as users run them (issue 14, points 2, 4, 5): the import manifest's Deployment
# cattle-cluster-agent and DaemonSet cattle-node-agent as real pods in the real two-node cluster
# of lib/cluster.sh behind the NAT router; tunnel-server on the management host.
#
#   sudo TPE2E_PREFIX=tpk E2E_STATE=/tmp/tpk tests/e2e/pods.sh
#
#   $P-mgmt    tunnel-server serve; kubectl/docker/curl as the users
#   $P-nat     router: MASQUERADE out, NEW connections in dropped
#   $P-down    node $P-cp: etcd, kube-apiserver, controller-manager, scheduler, dockerd,
#              cri-dockerd, kubelet, kube-proxy; the operator's curl | kubectl apply runs here
#   $P-worker  node $P-worker: dockerd, cri-dockerd, kubelet, kube-proxy
#
# Steps: cluster.sh up; the three images from the debug binaries (deploy/images/build.sh
# --profile debug --cargo never, no registry) loaded into both nodes; the server with
# --agent-image/--node-agent-image at that tag (the manifest's imagePullPolicy IfNotPresent then
# never pulls); `cluster add`, users, kubeconfig; then the shared steps of pods-steps.sh: the
# import as an operator, rollouts, Connected; kubectl through the server (nodes, a Deployment
# scaled 1 -> 3 -> 1 under get pods -w, describe, events); faults (cluster agent pod deleted with
# 1 and 2 replicas, rolling updates to a new image tag with 1 and 2 replicas, node agent pod
# deleted on each node, the worker's kubelet stopped for 60 s).
#
# Needs root, lib/build-k8s.sh all (cached), and target/debug/{tunnel-server,cattle-cluster-agent,
# cattle-node-agent} (built with `nice -n 19 cargo build -p server-side -p agent-cluster -p
# agent-node` only when missing; copied to the work directory first, so a concurrent build does
# not change them mid-run). Environment:
#   TPE2E_PREFIX (tpe2e), E2E_STATE (/tmp/$TPE2E_PREFIX): as for lib/cluster.sh
#   E2E_BIN_DIR       where the binaries are (default <repo>/target/debug)
#   E2E_KEEP=1        keep the cluster, the server and the work directory up after the run
#   PODS_KUBELET_STOP seconds the worker's kubelet is stopped (default 60)
# Every wait is bounded; traffic only on loopback and inside the namespaces. The EXIT trap stops
# what this script started (by pid), then `cluster.sh purge`, whether the run passed or not (the
# next run starts from a fresh cluster; the Kubernetes build cache is kept).
set -Eeuo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
L="$REPO/tests/e2e/lib"
# shellcheck source=lib/common.sh
. "$L/common.sh"
_tpe2e_name=pods
# shellcheck source=suite-lib.sh
. "$REPO/tests/e2e/suite-lib.sh"
# shellcheck source=pods-steps.sh
. "$REPO/tests/e2e/pods-steps.sh"
# shellcheck source=pods-stream-steps.sh
. "$REPO/tests/e2e/pods-stream-steps.sh"

P="${TPE2E_PREFIX:-tpe2e}"
export TPE2E_PREFIX="$P"
export E2E_STATE="${E2E_STATE:-/tmp/$P}"
C="$E2E_STATE/cluster"
SRC_BIN="${E2E_BIN_DIR:-$REPO/target/debug}"
NS_MGMT="$P-mgmt"; NS_DOWN="$P-down"
MGMT_IP=10.213.0.1
AGENT_REPO=tunnel-project
AGENT_TAG=pods1
BUSYBOX_IMAGE=tpe2e/busybox:latest
KUBELET_STOP="${PODS_KUBELET_STOP:-60}"
SUSER=ops
CLUSTER_NAME=pods-downstream
TMUX_SOCK="$P-pods-$$"
unset HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy KUBECONFIG DOCKER_HOST DOCKER_CONTEXT

W=""
CLUSTER_STARTED=0

cleanup() {
    local rc=$?
    cleanup_begin "$rc" || return 0
    if [[ $rc != 0 && -n "$W" && -d "$W/logs" ]]; then
        echo
        warn "suite FAILED (exit $rc) at ${FAILED_STEP:-step $STEP_NO ($STEP_TITLE)}"
        if ((CLUSTER_STARTED)); then
            kd -n cattle-system get pods -o wide >"$W/logs/cattle-pods.txt" 2>&1
            kd get events -A --sort-by=.lastTimestamp 2>&1 | tail -n 40 >"$W/logs/events.txt"
            local p
            for p in $(kd -n cattle-system get pods -o name 2>/dev/null); do
                kd -n cattle-system logs "$p" --tail 40 >"$W/logs/${p#pod/}.log" 2>&1
            done
        fi
        local f
        for f in "$W"/logs/*; do
            [[ -s "$f" ]] || continue
            printf '\n----- last lines of %s -----\n' "$f" >&2
            tail -n 20 "$f" >&2
        done
        mkdir -p "/tmp/$P-pods-logs.$$"
        cp -r "$W/logs/." "/tmp/$P-pods-logs.$$/" 2>/dev/null
        warn "logs kept in /tmp/$P-pods-logs.$$"
    fi
    printf '\n[e2e %7.1fs] ======== teardown ========\n' "$(since "$E2E_T0")"
    tmux -L "$TMUX_SOCK" kill-server 2>/dev/null
    local t0; t0="$(now)"
    if [[ "${E2E_KEEP:-0}" == 1 ]]; then
        info "E2E_KEEP=1: server (pid $(pid_of server 2>/dev/null)), cluster and $W kept; stop with: kill $(pid_of server 2>/dev/null); TPE2E_PREFIX=$P E2E_STATE=$E2E_STATE $L/cluster.sh purge; rm -rf $W"
    else
        if [[ -n "$W" && -d "$W/pids" ]]; then
            local pf name
            for pf in "$W"/pids/*.pid; do
                [[ -e "$pf" ]] || continue
                name="$(basename "$pf" .pid)"
                [[ "$name" == server ]] && continue
                stop_bg "$name" TERM 5
            done
            if alive server; then info "stopping the server (pid $(pid_of server))"; fi
            stop_bg server TERM 10
        fi
        if ((CLUSTER_STARTED)); then
            "$L/cluster.sh" purge 2>&1 | grep -E '==>|OK|WARN' | indent
        fi
        [[ -z "$W" || ! -d "$W" ]] || rm -rf "$W"
    fi
    info "teardown took $(since "$t0")s"
    suite_report "$rc"
    exit "$rc"
}
suite_traps cleanup

# === the suite's side of the pods-steps.sh interface ===
kd() { "$C/k8s/kubectl" "$@"; }
downstream_sh() {
    ind env -i PATH="$W/down-bin:/usr/bin:/bin" HOME="$W/down-home" KUBECONFIG="$C/k8s/admin.kubeconfig" \
        DOWN_CA="$W/down-home/ca.pem" bash -c "set -o pipefail; $1"
}
dk_argv() {
    DK_ARGV=(ip netns exec "$NS_MGMT" env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$W/home"
        DOCKER_HOST="tcp://$MGMT_IP:$SERVER_PORT/docker/nodes/$1" DOCKER_TLS_VERIFY=1
        DOCKER_CERT_PATH="$W/docker-certs" DOCKER_CONFIG="$W/docker-config" docker)
}
node_key() { if [[ "$1" == "$P-cp" ]]; then echo cp; else echo worker; fi; }
images_tag() {
    local n
    for n in cp worker; do timeout 60 docker -H "unix://$C/nodes/$n/docker/docker.sock" tag "$1" "$2"; done
}
kc_cmdline() {
    local user="$1"; shift
    printf '%q ' ip netns exec "$NS_MGMT" env -i PATH=/usr/bin:/bin HOME="$W/home" TERM=xterm \
        KUBECONFIG="$W/$user.kubeconfig" "$@" "$KUBECTL"
}
on_mgmt() { inm "$@"; }
server_log() { cat "$W/logs/server.log"; }
kubelet_stop() { "$L/cluster.sh" kubelet-stop "$(node_key "$1")" 2>&1 | grep -E 'OK|WARN|FAIL'; }
kubelet_start() { "$L/cluster.sh" kubelet-start "$(node_key "$1")" 2>&1 | grep -E 'OK|WARN|FAIL'; }

# =====================================================================================
part "Part 0: prerequisites"
# =====================================================================================

step "prerequisites: root, tools, the debug binaries, the cached Kubernetes binaries"
need_root
need_cmd ip nsenter setsid unshare docker dockerd jq curl python3 openssl awk md5sum tmux sha256sum
eval "$("$L/build-k8s.sh" paths)"
[[ -x "$KUBECTL" && -x "$KUBELET" && -x "$CRI_DOCKERD" ]] || fail "Kubernetes binaries not built: run tests/e2e/lib/build-k8s.sh all"
export KUBECTL
if [[ ! -x "$SRC_BIN/tunnel-server" || ! -x "$SRC_BIN/cattle-cluster-agent" || ! -x "$SRC_BIN/cattle-node-agent" ]]; then
    info "building the debug binaries (nice -n 19 cargo build -p server-side -p agent-cluster -p agent-node)"
    (cd "$REPO" && nice -n 19 cargo build -p server-side -p agent-cluster -p agent-node) 2>&1 | tail -n 3 | indent
fi
for ns in "$NS_MGMT" "$NS_DOWN"; do
    [[ ! -e "/run/netns/$ns" ]] || fail "namespace $ns exists (another run?): TPE2E_PREFIX=$P E2E_STATE=$E2E_STATE $L/cluster.sh down, or another TPE2E_PREFIX"
done
W="$(mktemp -d "/tmp/$P-pods.XXXXXX")"
chmod 755 "$W"
mkdir -p "$W/pids" "$W/logs" "$W/home" "$W/server" "$W/target/debug" "$W/down-bin" "$W/down-home" "$W/docker-certs" "$W/docker-config"
BIN="$W/target/debug"
for b in tunnel-server cattle-cluster-agent cattle-node-agent; do
    [[ -x "$SRC_BIN/$b" ]] || fail "missing $SRC_BIN/$b"
    cp "$SRC_BIN/$b" "$BIN/$b"
    info "$b: $("$BIN/$b" --version 2>&1 | sed -n 1p) (built $(date -r "$SRC_BIN/$b" +'%F %T'), copied)"
done
ln -s "$KUBECTL" "$W/down-bin/kubectl"
info "kubectl $("$KUBECTL" version --client -o json 2>/dev/null | jq -r .clientVersion.gitVersion); work directory $W"

# =====================================================================================
part "Part 1: the downstream cluster and the images"
# =====================================================================================

step "a real two-node Kubernetes cluster behind the NAT (cluster.sh up, with its verify)"
CLUSTER_STARTED=1
t0="$(now)"
# A cluster state left by an earlier run (etcd data: its cattle-system, whose agents would dial a
# server that is gone) is not reused: every run starts from a fresh cluster.
if [[ -d "$C" ]]; then
    info "removing the cluster state of an earlier run ($C): cluster.sh purge"
    "$L/cluster.sh" purge >"$W/logs/cluster-purge.log" 2>&1 || { tail -n 20 "$W/logs/cluster-purge.log" >&2; fail "cluster.sh purge failed"; }
fi
"$L/cluster.sh" up >"$W/logs/cluster-up.log" 2>&1 || { tail -n 30 "$W/logs/cluster-up.log" >&2; fail "cluster.sh up failed"; }
grep -E '==>|  OK' "$W/logs/cluster-up.log" | sed -E 's/^\[cluster\] //' | indent
# shellcheck disable=SC1091
. "$C/env"
NODES=("$NODE_CP" "$NODE_WORKER")
WORKER="$NODE_WORKER"
result "cluster.sh up (incl. verify)" "$(since "$t0")s"

step "the three images from the debug binaries, no registry (deploy/images/build.sh --profile debug --cargo never --tag $AGENT_TAG)"
t0="$(now)"
CARGO_TARGET_DIR="$W/target" nice -n 19 "$REPO/deploy/images/build.sh" --profile debug --cargo never --tag "$AGENT_TAG" \
    --docker-host "unix://$DOCKER_SOCK_CP" 2>&1 | indent
for img in tunnel-server cattle-cluster-agent cattle-node-agent; do
    "$L/cluster.sh" load-image "$AGENT_REPO/$img:$AGENT_TAG" 2>&1 | grep -E 'OK|FAIL' | indent
done
for n in cp worker; do
    info "$n: $(docker -H "unix://$C/nodes/$n/docker/docker.sock" images --format '{{.Repository}}:{{.Tag}}' | grep -E "^($AGENT_REPO|tpe2e)/" | sort | tr '\n' ' ')"
done
ok "images built and in both nodes in $(since "$t0")s"

# =====================================================================================
part "Part 2: the management server, the import"
# =====================================================================================

step "tunnel-server serve in $NS_MGMT (agent images :$AGENT_TAG in the manifest)"
SERVER_PORT="$(free_port "$MGMT_IP" "$NS_MGMT")"
SERVER_URL="https://$MGMT_IP:$SERVER_PORT"
bg_run server "$NS_MGMT" "$W/logs/server.log" env -i PATH=/usr/bin:/bin RUST_LOG=info \
    "$BIN/tunnel-server" --data-dir "$W/server" serve --listen "$MGMT_IP:$SERVER_PORT" \
    --server-url "$SERVER_URL" --probe-interval 5 --shutdown-grace 5 \
    --agent-image "$AGENT_REPO/cattle-cluster-agent:$AGENT_TAG" --node-agent-image "$AGENT_REPO/cattle-node-agent:$AGENT_TAG"
wait_until 30 "server /healthz" sc --max-time 2 "$SERVER_URL/healthz" || fail "the server did not answer /healthz"
info "listening at $SERVER_URL (pid $(pid_of server)), up in ${WAITED}s"
info "from a pod's node ($NS_DOWN) through the NAT: GET /ping -> $(ind curl -sS --max-time 5 --cacert "$W/server/ca.pem" "$SERVER_URL/ping")"

step "tunnel-server cluster add / user add / kubeconfig; the downstream RBAC for the user"
ts cluster add "$CLUSTER_NAME" >"$W/cluster-add.out"
indent <"$W/cluster-add.out"
CLUSTER_ID="$(sed -n 's/^cluster .* created as \([^ ]*\)$/\1/p' "$W/cluster-add.out")"
IMPORT_URL="$(awk '/kubectl apply -f/ {print $NF}' "$W/cluster-add.out")"
[[ -n "$CLUSTER_ID" && "$IMPORT_URL" == "$SERVER_URL/v3/import/"* ]] || fail "unexpected 'cluster add' output"
ts user add pods-admin --admin >"$W/user-admin.out"
ADMIN_TOKEN="$(sed -n 's/^API token (shown once): //p' "$W/user-admin.out")"
ts user add "$SUSER" >"$W/user-$SUSER.out"
OPS_TOKEN="$(sed -n 's/^API token (shown once): //p' "$W/user-$SUSER.out")"
[[ -n "$ADMIN_TOKEN" && -n "$OPS_TOKEN" ]] || fail "no API token from 'user add'"
ts grant "$SUSER" "$CLUSTER_NAME" | indent
ts kubeconfig "$CLUSTER_NAME" --user "$SUSER" >"$W/$SUSER.kubeconfig"
chmod 600 "$W/$SUSER.kubeconfig"
KC_ARGV=(ip netns exec "$NS_MGMT" env -i PATH=/usr/bin:/bin HOME="$W/home" KUBECONFIG="$W/$SUSER.kubeconfig" "$KUBECTL")
info "$SUSER.kubeconfig server: $(awk '/server:/ {print $2}' "$W/$SUSER.kubeconfig")"
kd create clusterrolebinding pods-ops-cluster-admin --clusterrole=cluster-admin --user="$SUSER" 2>&1 | indent
cp "$W/server/ca.pem" "$W/down-home/ca.pem"
cp "$W/server/ca.pem" "$W/docker-certs/ca.pem"
jq -n --arg t "Bearer $OPS_TOKEN" '{HttpHeaders: {Authorization: $t}}' >"$W/docker-config/config.json"
ok "cluster $CLUSTER_ID; user $SUSER (granted, cluster-admin downstream through impersonation)"

pods_import
result "import: Deployment rolled out (from the apply)" "${T_ROLLOUT_DEPLOY}s"
result "import: DaemonSet rolled out (from the apply)" "${T_ROLLOUT_DS}s"
result "import: Connected + all nodes connected (from the apply)" "${T_CONNECTED}s"

step "the management host still cannot reach the apiserver or a kubelet directly"
rc=0; inm curl -sS -o /dev/null --max-time 3 -k "$APISERVER_URL/version" 2>/dev/null || rc=$?
[[ $rc != 0 ]] || fail "mgmt reached $APISERVER_URL directly"
ok "direct $APISERVER_URL from $NS_MGMT: curl exit $rc (everything goes through the tunnels)"

# =====================================================================================
part "Part 3: kubectl through the server"
# =====================================================================================
pods_workload

# =====================================================================================
part "Part 3b: streams into pods (exec -it, attach, port-forward, cp, logs -f, run, debug)"
# =====================================================================================
pods_streaming

step "docker through the server, for each node (the node agents' tunnels to their own node's dockerd)"
for i in "${!NODES[@]}"; do
    dk_argv "${NODE_IDS[$i]}"
    info "${NODES[$i]} (${NODE_IDS[$i]}): $("${DK_ARGV[@]}" info --format 'name={{.Name}} containers={{.ContainersRunning}} docker {{.ServerVersion}}' 2>&1)"
    "${DK_ARGV[@]}" ps --format '{{.Names}}' 2>&1 | grep -E '^k8s_(bb|agent|cluster-register)_' | cut -c1-90 | indent
done
ok "each node's docker answers through its node agent"

# =====================================================================================
part "Part 4: faults with pods"
# =====================================================================================

fault_delete_cluster_agent
result "cluster agent pod deleted (1 replica): not Connected" "${NOT_CONNECTED}s (slowest kubectl $(probe_max kprobe)s)"
fault_rolling_update pods2
result "rolling update to :pods2 (1 replica): not Connected" "${NOT_CONNECTED}s (fewer nodes connected ${NODES_DOWN}s)"
fault_scale_two
fault_delete_cluster_agent
result "cluster agent pod deleted (2 replicas): not Connected" "${NOT_CONNECTED}s (slowest kubectl $(probe_max kprobe)s)"
fault_rolling_update pods3
result "rolling update to :pods3 (2 replicas): not Connected" "${NOT_CONNECTED}s (fewer nodes connected ${NODES_DOWN}s)"
for i in "${!NODES[@]}"; do
    fault_delete_node_agent "${NODES[$i]}" "${NODE_IDS[$i]}"
    result "node agent pod deleted on ${NODES[$i]}: new pod Ready after" "${T_NA_READY}s; docker back at +${T_DOCKER_BACK}s, $(awk '$3 != 0' "$W/dprobe.probe" | wc -l) calls failed (fast)"
done
for i in "${!NODES[@]}"; do [[ "${NODES[$i]}" == "$WORKER" ]] && wid="${NODE_IDS[$i]}"; done
fault_kubelet "$WORKER" "$wid" "$KUBELET_STOP"
result "kubelet of $WORKER stopped ${KUBELET_STOP}s: NotReady seen at" "+${T_NOTREADY:-never}s"

step "steady state after the faults: Connected, nodes connected, kubectl and docker work"
wait_until 30 "Connected" probe_connected || true
api "/v1/clusters/$CLUSTER_ID" | jq -c '{id, tunnel, aggregationTunnel, connected}' | indent
api "/v1/nodes?cluster=$CLUSTER_ID" | jq -c '(.items // .)[] | {id, hostname, connected}' | indent
[[ "$(api "/v1/clusters/$CLUSTER_ID" | jq -r .connected)" == true ]] || fail "cluster not Connected"
kd -n cattle-system wait --for=condition=Ready pods --all --timeout=60s 2>&1 | indent || fail "agent pods not Ready again"
kc "$SUSER" -n cattle-system get pods -o wide 2>&1 | indent
info "server: $(metric tunnel_server_sessions) sessions, $(metric tunnel_server_streams) streams"
ok "all good"

part "done"

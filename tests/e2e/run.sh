#!/usr/bin/env bash
# End-to-end suite (issue #8): the management server, both agents, a real kube-apiserver and a
# real dockerd, with the downstream host behind NAT in network namespaces, driven by the real
# kubectl and docker CLIs, plus faults. Prints every step with its timing and a summary.
#
#   sudo tests/e2e/run.sh
#
#   tpe2e-mgmt  tunnel-server serve (SQLite in a temp dir); kubectl, docker, curl as the users
#   tpe2e-nat   router: MASQUERADE out, NEW connections in dropped
#   tpe2e-down  etcd + kube-apiserver (RBAC), dockerd, cattle-cluster-agent, cattle-node-agent
#
# Needs root, the Debian packages of tests/e2e/lib/deps.sh, /usr/bin/kubectl, the cached
# kube-apiserver/kubectl/etcd (tests/e2e/lib/build-k8s.sh: ~15 min the first time) and the release
# binaries (built here only when missing, or always with E2E_BUILD=1):
#   cargo build --release -p server-side -p agent-cluster -p agent-node
#
# Environment:
#   E2E_BUILD=1        run the cargo build above first (otherwise only when a binary is missing)
#   E2E_BIN_DIR        where the binaries are (default <repo>/target/release)
#   E2E_CUT_SECONDS    length of the NAT link cut (default 90)
#   E2E_BULK           number of ConfigMaps in the big list (default 5000)
#   E2E_BACKOFF_MAX    agents' reconnect cap, CATTLE_AGENT_BACKOFF_MAX (default: the agents'
#                      own default, 30s); the reconnect checks allow this plus 10 s
#   E2E_KEEP=1         keep the work directory (logs, data) after the run
#   E2E_TRACE=1        trace logging in the server and the agents (CATTLE_TRACE)
#   E2E_HOLD_AT=N      debugging: stop at the start of step N with everything running, until
#                      $W/continue exists (30 min at most); $W/env has the variables
#   TPE2E_PREFIX       namespace name prefix (default tpe2e)
#
# Every wait is bounded; traffic goes only to loopback and to 10.213.x addresses inside the
# namespaces created here. An EXIT trap stops every process started here (by pid), the
# kube-apiserver, dockerd, and deletes the namespaces, whether the run passed or not; on
# failure the logs are copied to /tmp/tpe2e-logs.<pid> first.
set -Eeuo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
L="$REPO/tests/e2e/lib"
# shellcheck source=lib/common.sh
. "$L/common.sh"
_tpe2e_name=e2e
# shellcheck source=suite-lib.sh
. "$REPO/tests/e2e/suite-lib.sh"

BIN="${E2E_BIN_DIR:-$REPO/target/release}"
P="${TPE2E_PREFIX:-tpe2e}"
export TPE2E_PREFIX="$P"
NS_MGMT="$P-mgmt"; NS_NAT="$P-nat"; NS_DOWN="$P-down"
MGMT_IP=10.213.0.1
CUT_SECONDS="${E2E_CUT_SECONDS:-90}"
BULK="${E2E_BULK:-5000}"
BACKOFF_MAX="${E2E_BACKOFF_MAX:-}"
BACKOFF_CAP_S="${BACKOFF_MAX:-30s}"; BACKOFF_CAP_S="${BACKOFF_CAP_S%s}"
IMAGE=tpe2e/busybox:latest
NODE_NAME="$P-down-node-1"
TMUX_SOCK="tpe2e-run-$$"
unset HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy KUBECONFIG DOCKER_HOST DOCKER_CONTEXT

W=""

# === cleanup ===

cleanup() {
    local rc=$?
    cleanup_begin "$rc" || return 0
    if [[ $rc != 0 ]]; then
        echo
        warn "suite FAILED (exit $rc) at ${FAILED_STEP:-step $STEP_NO ($STEP_TITLE)}"
        if [[ -n "$W" && -d "$W/logs" ]]; then
            local f
            for f in "$W"/logs/*.log; do
                [[ -s "$f" ]] || continue
                printf '\n----- last lines of %s -----\n' "$f" >&2
                tail -n 25 "$f" >&2
            done
            mkdir -p "/tmp/tpe2e-logs.$$"
            cp -r "$W/logs/." "/tmp/tpe2e-logs.$$/" 2>/dev/null
            cp "$W"/k8s/*.log "/tmp/tpe2e-logs.$$/" 2>/dev/null
            warn "logs kept in /tmp/tpe2e-logs.$$"
        fi
    fi
    printf '\n[e2e %7.1fs] ======== teardown ========\n' "$(since "$E2E_T0")"
    local t0; t0="$(now)"
    tmux -L "$TMUX_SOCK" kill-server 2>/dev/null
    if [[ -n "$W" && -d "$W/pids" ]]; then
        local pf name
        # clients first (they hold streams the agents would wait for), then agents, then the server
        local clients=() agents=()
        for pf in "$W"/pids/*.pid; do
            case "$(basename "$pf" .pid)" in
                server) ;;
                ca[0-9]* | na[0-9]*) agents+=("$pf") ;;
                *) clients+=("$pf") ;;
            esac
        done
        for pf in "${clients[@]}" "${agents[@]}" "$W/pids/server.pid"; do
            [[ -e "$pf" ]] || continue
            name="$(basename "$pf" .pid)"
            if alive "$name"; then info "stopping $name (pid $(pid_of "$name"))"; fi
            stop_bg "$name" TERM 10
        done
    fi
    if [[ -s "/run/$P-netns.cut" ]]; then "$L/netns.sh" restore >/dev/null 2>&1; fi
    if [[ -n "$W" && -d "$W/k8s" ]]; then "$L/kube-apiserver.sh" stop "$W/k8s" 2>&1 | grep -E 'OK|WARN' | indent; fi
    if [[ -n "$W" && -d "$W/docker" ]]; then "$L/dockerd.sh" purge "$W/docker" 2>&1 | grep -E 'OK|WARN' | indent; fi
    if ((OWN_NETNS)); then "$L/netns.sh" down 2>&1 | grep -E 'OK|WARN|TERM|KILL' | indent; fi
    local left=""
    for ns in "$NS_MGMT" "$NS_NAT" "$NS_DOWN"; do [[ -e "/run/netns/$ns" ]] && left+=" $ns"; done
    [[ -z "$left" ]] || warn "namespaces left:$left"
    if [[ -n "$W" && -d "$W" ]]; then
        if [[ "${E2E_KEEP:-0}" == 1 ]]; then info "work directory kept: $W"; else rm -rf "$W"; fi
    fi
    info "teardown took $(since "$t0")s"
    suite_report "$rc"
    exit "$rc"
}
OWN_NETNS=0
suite_traps cleanup

# =====================================================================================
part "Part 0: prerequisites"
# =====================================================================================

step "prerequisites: root, tools, binaries, cached kube-apiserver/etcd"
need_root
need_cmd ip nsenter setsid kubectl docker dockerd tmux jq curl socat python3 openssl awk md5sum
eval "$("$L/build-k8s.sh" paths)"
[[ -x "$KUBE_APISERVER" && -x "$ETCD" && -x "$KUBECTL" ]] || fail "kube-apiserver/kubectl/etcd not built: run tests/e2e/lib/build-k8s.sh (~15 min once)"
export KUBECTL   # kube-apiserver.sh's admin wrapper (kd) uses it too
if [[ "${E2E_BUILD:-0}" == 1 || ! -x "$BIN/tunnel-server" || ! -x "$BIN/cattle-cluster-agent" || ! -x "$BIN/cattle-node-agent" ]]; then
    info "building the release binaries (cargo build --release -p server-side -p agent-cluster -p agent-node)"
    (cd "$REPO" && cargo build --release -p server-side -p agent-cluster -p agent-node) 2>&1 | tail -n 3 | indent
fi
for b in tunnel-server cattle-cluster-agent cattle-node-agent; do
    [[ -x "$BIN/$b" ]] || fail "missing $BIN/$b"
    info "$b: $("$BIN/$b" --version 2>&1 | sed -n 1p) ($(date -r "$BIN/$b" +'%F %T'))"
done
info "kubectl $("$KUBECTL" version --client -o json 2>/dev/null | jq -r .clientVersion.gitVersion) (built with the apiserver; Debian's: $(kubectl version --client -o json 2>/dev/null | jq -r .clientVersion.gitVersion)), docker CLI $(docker version --format '{{.Client.Version}}' 2>/dev/null), $("$KUBE_APISERVER" --version), etcd $("$ETCD" --version | awk 'NR==1{print $3}')"
for ns in "$NS_MGMT" "$NS_NAT" "$NS_DOWN"; do
    [[ ! -e "/run/netns/$ns" ]] || fail "namespace $ns already exists (another run, or stack.sh up?): run 'tests/e2e/lib/stack.sh down' or set TPE2E_PREFIX"
done
W="$(mktemp -d /tmp/tpe2e-run.XXXXXX)"
mkdir -p "$W/pids" "$W/logs" "$W/home" "$W/server" "$W/agents"
chmod 755 "$W"
info "work directory $W"

# =====================================================================================
part "Part 1: topology"
# =====================================================================================

step "network namespaces $NS_MGMT / $NS_NAT / $NS_DOWN (netns.sh up)"
OWN_NETNS=1
"$L/netns.sh" up 2>&1 | grep -E '==>|OK|  -A' | indent

step "the mgmt host cannot open a TCP connection to the downstream host; the downstream host reaches mgmt (netns.sh check)"
"$L/netns.sh" check 2>&1 | grep -E '==>|OK|WARN|FAIL|listener|client' | indent

# =====================================================================================
part "Part 2: the downstream host"
# =====================================================================================

step "etcd + kube-apiserver (RBAC) in $NS_DOWN"
"$L/kube-apiserver.sh" start "$W/k8s" "$NS_DOWN" 2>&1 | grep -E 'OK|apiserver https|FAIL' | indent
# shellcheck disable=SC1091
. "$W/k8s/env"
unset KUBECONFIG
info "apiserver $APISERVER_URL (only reachable inside $NS_DOWN)"
kd get --raw /version | jq -c '{gitVersion, platform}' | indent

step "dockerd in $NS_DOWN and the busybox image"
"$L/dockerd.sh" start "$W/docker" "$NS_DOWN" 2>&1 | grep -E 'OK|FAIL|info:' | indent
"$L/busybox-image.sh" "$W/docker/docker.sock" "$IMAGE" 2>&1 | grep -E 'OK|FAIL' | indent
DOCKER_SOCK="$W/docker/docker.sock"

# =====================================================================================
part "Part 3: management server, import, agents"
# =====================================================================================

step "tunnel-server serve in $NS_MGMT (SQLite store in $W/server)"
SERVER_PORT="$(free_port "$MGMT_IP" "$NS_MGMT")"
SERVER_URL="https://$MGMT_IP:$SERVER_PORT"
SERVER_RUST_LOG=info
[[ -z "${E2E_TRACE:-}" ]] || SERVER_RUST_LOG="trace,rustls=info,hyper=debug"
start_server() {
    bg_run server "$NS_MGMT" "$W/logs/server.log" env -i PATH=/usr/bin:/bin RUST_LOG="$SERVER_RUST_LOG" \
        "$BIN/tunnel-server" --data-dir "$W/server" serve --listen "$MGMT_IP:$SERVER_PORT" \
        --server-url "$SERVER_URL" --probe-interval 5 --shutdown-grace 5
    wait_until 30 "server /healthz" sc --max-time 2 "$SERVER_URL/healthz" ||
        fail "the server did not answer /healthz"
}
start_server
info "listening at $SERVER_URL (pid $(pid_of server)), up in ${WAITED}s: $(grep -m1 'listening on' "$W/logs/server.log")"
info "from $NS_DOWN through the NAT: GET /ping -> $(ind curl -sS --max-time 5 --cacert "$W/server/ca.pem" "$SERVER_URL/ping")"

step "tunnel-server cluster add / user add / grant / kubeconfig"
ts cluster add e2e-downstream >"$W/cluster-add.out"
indent <"$W/cluster-add.out"
CLUSTER_ID="$(sed -n 's/^cluster .* created as \([^ ]*\)$/\1/p' "$W/cluster-add.out")"
IMPORT_URL="$(awk '/kubectl apply -f/ {print $NF}' "$W/cluster-add.out")"
[[ -n "$CLUSTER_ID" && "$IMPORT_URL" == "$SERVER_URL/v3/import/"* ]] || fail "unexpected 'cluster add' output"
user_add() {   # user_add NAME [flags] -> prints the API token
    ts user add "$@" >"$W/user-$1.out"
    sed -n 's/^API token (shown once): //p' "$W/user-$1.out"
}
ADMIN_TOKEN="$(user_add e2e-admin --admin)"
ALICE_TOKEN="$(user_add alice --group e2e-users)"
BOB_TOKEN="$(user_add bob)"
[[ -n "$ADMIN_TOKEN" && -n "$ALICE_TOKEN" && -n "$BOB_TOKEN" ]] || fail "no API token from 'user add'"
ts grant alice e2e-downstream | indent
ts grant bob e2e-downstream | indent
ts kubeconfig e2e-downstream --user alice >"$W/alice.kubeconfig"
ts kubeconfig e2e-downstream --user bob >"$W/bob.kubeconfig"
chmod 600 "$W"/*.kubeconfig
info "alice.kubeconfig server: $(awk '/server:/ {print $2}' "$W/alice.kubeconfig")"
ts user list | indent

step "import manifest applied in the downstream cluster (RBAC: cattle-system/cattle bound to cattle-admin)"
ind curl -sS --max-time 10 --cacert "$W/server/ca.pem" -o "$W/import.yaml" "$IMPORT_URL?nodeAgent=true"
info "fetched $IMPORT_URL?nodeAgent=true from $NS_DOWN: $(grep -c '^kind:' "$W/import.yaml") objects"
kd apply -f "$W/import.yaml" | indent
crb="$(kd get clusterrolebinding cattle-admin-binding -o json)"
info "cattle-admin-binding: $(jq -c '{role: .roleRef.name, subjects: [.subjects[] | "\(.kind) \(.namespace)/\(.name)"]}' <<<"$crb")"
[[ "$(kd auth can-i '*' '*' --as=system:serviceaccount:cattle-system:cattle)" == yes ]] || fail "cattle SA is not cluster admin"
ok "system:serviceaccount:cattle-system:cattle can '*' '*'"
info "(no controllers or kubelet here: the Deployment and DaemonSet exist as objects only; their pods are the processes started below)"

step "cluster agent in $NS_DOWN with in-cluster-style settings"
# The service-account token (TokenRequest; token Secrets stay empty without a controller-manager)
# and the CA, where a pod would have them mounted.
mkdir -p "$W/agents/sa" "$W/agents/credentials"
kd -n cattle-system create token cattle --duration=12h >"$W/agents/sa/token"
cp "$W/k8s/pki/ca.crt" "$W/agents/sa/ca.crt"
info "service-account token: $(head -c 20 "$W/agents/sa/token")... ($(wc -c <"$W/agents/sa/token") bytes), ca.crt from the apiserver PKI"
# The Deployment's container env, as the import manifest defines it.
deploy_env="$(kd -n cattle-system get deployment cattle-cluster-agent -o json |
    jq -r '.spec.template.spec.containers[0].env[] | select(.value != null) | "\(.name)=\(.value)"')"
mapfile -t CLUSTER_ENV <<<"$deploy_env"
CRED_NAME="$(sed -n 's/^CATTLE_CREDENTIAL_NAME=//p' <<<"$deploy_env")"
# /cattle-credentials: the Secret the Deployment mounts, read back from the apiserver.
secret="$(kd -n cattle-system get secret "$CRED_NAME" -o json)"
for k in url token namespace; do
    jq -r ".data.$k // \"\" | @base64d" <<<"$secret" | tr -d '\n' >"$W/agents/credentials/$k"
done
chmod 700 "$W/agents/credentials"; chmod 400 "$W/agents/credentials"/*
info "Deployment env: $(printf '%s ' "${CLUSTER_ENV[@]}" | sed 's/CATTLE_CA_CHECKSUM=\([0-9a-f]\{12\}\)[0-9a-f]*/CATTLE_CA_CHECKSUM=\1…/')"
info "credentials from Secret $CRED_NAME: url=$(cat "$W/agents/credentials/url") token=$(head -c 6 "$W/agents/credentials/token")…"
[[ -n "$BACKOFF_MAX" ]] && info "CATTLE_AGENT_BACKOFF_MAX=$BACKOFF_MAX"
# CATTLE_SA_TOKEN_WAIT=1s: the lone apiserver has no token controller, so SA cattle's token
# Secret stays empty; the agent falls back to the token above after 1 s instead of its default
# 10 s. (With kube-controller-manager, as in tests/e2e/pods.sh, the Secret's token is used.)
start_cluster_agent() {   # start_cluster_agent NAME
    local name="$1" hp
    mkdir -p "$W/agents/$name/state"
    hp="$(free_port 127.0.0.1 "$NS_DOWN")"
    echo "$hp" >"$W/agents/$name/health-port"
    bg_run "$name" "$NS_DOWN" "$W/logs/$name.log" env -i PATH=/usr/bin:/bin HOME="$W/agents/$name" \
        "${CLUSTER_ENV[@]}" \
        KUBERNETES_SERVICE_HOST="$APISERVER_IP" KUBERNETES_SERVICE_PORT="$APISERVER_PORT" \
        CATTLE_SA_TOKEN_FILE="$W/agents/sa/token" CATTLE_SA_CA_FILE="$W/agents/sa/ca.crt" \
        CATTLE_CREDENTIALS_DIR="$W/agents/credentials" CATTLE_AGENT_STATE_DIR="$W/agents/$name/state" \
        CATTLE_AGENT_HEALTH_ADDR="127.0.0.1:$hp" ${BACKOFF_MAX:+CATTLE_AGENT_BACKOFF_MAX=$BACKOFF_MAX} \
        CATTLE_SA_TOKEN_WAIT=1s \
        ${E2E_TRACE:+CATTLE_TRACE=true} "$BIN/cattle-cluster-agent"
}
agent_ready() { ind curl -sf --max-time 2 "http://127.0.0.1:$(cat "$W/agents/$1/health-port")/readyz"; }
start_cluster_agent ca1
wait_until 30 "cluster agent tunnels registered" cluster_connected ||
    fail "the cluster agent did not connect: $(tail -n 5 "$W/logs/ca1.log")"
info "main + steve tunnels registered in ${WAITED}s (pid $(pid_of ca1))"
wait_until 10 "agent /readyz" agent_ready ca1 || fail "agent /readyz not ok"
api "/v1/clusters/$CLUSTER_ID" | jq -c '{id, apiEndpoint, tunnel, aggregationTunnel}' | indent
wait_until 30 "stv-aggregation Secret" kd -n cattle-system get secret stv-aggregation ||
    fail "the agent did not write stv-aggregation"
info "stv-aggregation Secret written by the agent: keys $(kd -n cattle-system get secret stv-aggregation -o json | jq -c '.data | keys')"
probe_connected() { api "/v1/clusters/$CLUSTER_ID" | jq -e '.connected == true'; }
if wait_until 20 "Connected probe" probe_connected; then
    ok "server probe: cluster Connected after ${WAITED}s"
else
    warn "server probe did not report Connected within 20 s: $(api "/v1/clusters/$CLUSTER_ID" | jq -c '{connected, connectedMessage}')"
fi

step "node agent in $NS_DOWN (DaemonSet env) on the real dockerd's socket"
ds_env="$(kd -n cattle-system get daemonset cattle-node-agent -o json |
    jq -r '.spec.template.spec.containers[0].env[] | select(.value != null) | "\(.name)=\(.value)"')"
mapfile -t NODE_ENV <<<"$ds_env"
info "DaemonSet env: $(printf '%s ' "${NODE_ENV[@]}" | sed 's/CATTLE_CA_CHECKSUM=\([0-9a-f]\{12\}\)[0-9a-f]*/CATTLE_CA_CHECKSUM=\1…/') + CATTLE_NODE_NAME=$NODE_NAME (fieldRef spec.nodeName) CATTLE_DOCKER_SOCKET=$DOCKER_SOCK"
NODE_ID="m-$(printf '%s' "$NODE_NAME" | md5sum | cut -c1-12)"
start_node_agent() {   # start_node_agent NAME [extra VAR=value...]
    local name="$1" hp; shift
    mkdir -p "$W/agents/$name/state"
    hp="$(free_port 127.0.0.1 "$NS_DOWN")"
    echo "$hp" >"$W/agents/$name/health-port"
    bg_run "$name" "$NS_DOWN" "$W/logs/$name.log" env -i PATH=/usr/bin:/bin:/usr/sbin:/sbin HOME="$W/agents/$name" \
        "${NODE_ENV[@]}" CATTLE_NODE_NAME="$NODE_NAME" CATTLE_DOCKER_SOCKET="$DOCKER_SOCK" \
        CATTLE_CREDENTIALS_DIR="$W/agents/credentials" CATTLE_AGENT_STATE_DIR="$W/agents/$name/state" \
        CATTLE_AGENT_HEALTH_ADDR="127.0.0.1:$hp" ${BACKOFF_MAX:+CATTLE_AGENT_BACKOFF_MAX=$BACKOFF_MAX} \
        CATTLE_SA_TOKEN_WAIT=1s \
        ${E2E_TRACE:+CATTLE_TRACE=true} "$@" "$BIN/cattle-node-agent"
}
start_node_agent na1
node_up_or_refused() { node_connected || grep -q 'not found' "$W/logs/na1.log"; }
wait_until 20 "node agent registered (or refused)" node_up_or_refused || true
if ! node_connected; then
    if grep -q 'not found' "$W/logs/na1.log" && grep -q '^CATTLE_AGENT_CONNECT=true$' <<<"$ds_env"; then
        warn "FINDING: with the DaemonSet's CATTLE_AGENT_CONNECT=true the node agent dials /v3/connect and the server refuses a node it has never seen:"
        grep -m1 'not found' "$W/logs/na1.log" | cut -c1-300 | indent >&2
        warn "continuing with CATTLE_AGENT_CONNECT=false (register on first connect), as a docker-run node agent would"
        stop_bg na1 TERM 10
        NODE_ENV=("${NODE_ENV[@]/CATTLE_AGENT_CONNECT=true/CATTLE_AGENT_CONNECT=false}")
        start_node_agent na1
        wait_until 20 "node agent registered" node_connected || fail "node agent did not connect: $(tail -n 5 "$W/logs/na1.log")"
    else
        fail "node agent did not connect: $(tail -n 5 "$W/logs/na1.log")"
    fi
fi
info "node $NODE_ID registered and connected in ${WAITED}s (pid $(pid_of na1))"
api "/v1/nodes/$NODE_ID" | jq -c '{id, clusterId, hostname, dockerSocket, connected, docker: .params.dockerInfo.ServerVersion}' | indent
wait_until 10 "node agent /readyz" agent_ready na1 || fail "node agent /readyz not ok"
wait_until 10 "3 tunnel sessions" sessions_are 3 || fail "expected 3 sessions (cluster, steve, node), have $(metric tunnel_server_sessions)"
ok "server has 3 tunnel sessions: $(metrics | awk -F'"' '/^tunnel_server_tunnel_bytes.*receive/ {printf "%s ", $2}')"

step "the mgmt host still cannot reach the apiserver or dockerd directly (only through the tunnels)"
rc=0; inm curl -sS -o /dev/null --max-time 3 --cacert "$W/k8s/pki/ca.crt" "$APISERVER_URL/version" 2>"$W/direct.err" || rc=$?
[[ $rc != 0 ]] || fail "mgmt reached $APISERVER_URL directly"
ok "direct $APISERVER_URL from $NS_MGMT: curl exit $rc ($(sed -n 1p "$W/direct.err"))"

# =====================================================================================
part "Part 4: kubectl through the server"
# =====================================================================================

step "downstream RBAC for the users: alice bound to ClusterRole e2e-user, bob bound to nothing"
cat >"$W/rbac.yaml" <<'EOF'
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: e2e-user}
rules:
- apiGroups: [""]
  resources: [namespaces, configmaps, secrets, services]
  verbs: ["*"]
- apiGroups: [apps]
  resources: [deployments]
  verbs: ["*"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: e2e-user-alice}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: e2e-user}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: alice}
EOF
kd apply -f "$W/rbac.yaml" | indent

step "kubectl get ns (alice's kubeconfig, through the server and the tunnel)"
kc alice get ns 2>&1 | indent
names="$(kc alice get ns -o name)"
[[ $'\n'"$names"$'\n' == *$'\nnamespace/cattle-system\n'* ]] || fail "cattle-system not listed"
info "kubectl auth whoami: $(kc alice auth whoami -o json 2>/dev/null | jq -c '.status.userInfo | {username, groups}')"

step "kubectl apply and delete of objects"
kc alice create namespace e2e-apply | indent
cat >"$W/objects.yaml" <<'EOF'
apiVersion: v1
kind: ConfigMap
metadata: {name: app-config, namespace: e2e-apply}
data: {greeting: "hello through the tunnel"}
---
apiVersion: v1
kind: Secret
metadata: {name: app-secret, namespace: e2e-apply}
stringData: {password: s3cret}
---
apiVersion: v1
kind: Service
metadata: {name: app, namespace: e2e-apply}
spec:
  ports: [{port: 80, targetPort: 8080}]
  selector: {app: app}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: app, namespace: e2e-apply}
spec:
  replicas: 1
  selector: {matchLabels: {app: app}}
  template:
    metadata: {labels: {app: app}}
    spec: {containers: [{name: app, image: tpe2e/busybox:latest}]}
EOF
kc alice apply -f "$W/objects.yaml" 2>&1 | indent
kc alice -n e2e-apply get cm,secret,svc,deploy 2>&1 | indent
[[ "$(kd -n e2e-apply get cm app-config -o jsonpath='{.data.greeting}')" == "hello through the tunnel" ]] ||
    fail "the ConfigMap is not in the downstream apiserver"
ok "objects are in the downstream apiserver"
sed -i 's/hello through the tunnel/changed/' "$W/objects.yaml"
kc alice apply -f "$W/objects.yaml" 2>&1 | indent
[[ "$(kd -n e2e-apply get cm app-config -o jsonpath='{.data.greeting}')" == changed ]] || fail "apply did not update"
kc alice delete -f "$W/objects.yaml" --wait=false 2>&1 | indent
left="$(kd -n e2e-apply get cm,secret,svc,deploy -o name 2>/dev/null | grep -v kube-root-ca || true)"
[[ -z "$left" ]] || fail "objects left after delete: $left"
ok "apply (create, update) and delete went through"

step "kubectl get -w sees each change within a second"
kc alice create namespace e2e-watch | indent
kc alice -n e2e-watch create configmap sentinel --from-literal=v=0 | indent
bg_run watch "" "$W/logs/watch.log" bash -c "$(printf '%q ' ip netns exec "$NS_MGMT" env -i PATH=/usr/bin:/bin HOME="$W/home" KUBECONFIG="$W/alice.kubeconfig" "$KUBECTL" -n e2e-watch get configmaps -w --output-watch-events -o 'jsonpath={.type} {.object.metadata.name} {.object.data.v}{"\n"}') | while IFS= read -r l; do printf '%s %s\n' \"\$(date +%s.%N)\" \"\$l\"; done >$W/watch.out"
wait_until 20 "watch lists the sentinel" grep -q sentinel "$W/watch.out" || fail "kubectl get -w printed nothing"
sleep 1   # the watch request follows the initial list
watch_change() {   # watch_change DESCRIPTION PATTERN CMD...: run CMD downstream, time until the watch prints PATTERN
    local what="$1" pat="$2"; shift 2
    local before after line seen lat
    before="$(now)"
    "$@" >/dev/null
    after="$(now)"
    wait_until 5 "watch shows $what" grep -qE "$pat" "$W/watch.out" || fail "kubectl get -w did not show $what within 5 s"
    line="$(grep -m1 -E "$pat" "$W/watch.out")"
    seen="${line%% *}"
    lat="$(awk -v s="$seen" -v a="$after" 'BEGIN { d = s - a; if (d < 0) d = 0; printf "%.3f", d }')"
    info "$what: seen $(awk -v s="$seen" -v b="$before" 'BEGIN{printf "%.3f", s-b}')s after the command started, ${lat}s after it returned: ${line#* }"
    fcmp "$lat" '<' 1.0 || fail "$what took ${lat}s (> 1 s) to reach the watch"
}
watch_change "create w1" ' ADDED w1 ' kd -n e2e-watch create configmap w1 --from-literal=v=1
watch_change "update w1" ' MODIFIED w1 2' kd -n e2e-watch patch configmap w1 -p '{"data":{"v":"2"}}'
watch_change "delete w1" ' DELETED w1 ' kd -n e2e-watch delete configmap w1
alive watch || fail "kubectl get -w exited"
stop_bg watch TERM 5
ok "watch stream delivered create/update/delete within a second each"

step "a list of $BULK ConfigMaps: one kubectl apply -f of a generated List, then get cm -A --chunk-size=500"
python3 - "$W/bulk.json" "$BULK" <<'PY'
import json, sys
n = int(sys.argv[2])
items = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "e2e-bulk"}}]
items += [{"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": "cm-%05d" % i, "namespace": "e2e-bulk", "labels": {"e2e": "bulk"}},
           "data": {"index": str(i), "payload": "x" * 256}} for i in range(n)]
json.dump({"apiVersion": "v1", "kind": "List", "items": items}, open(sys.argv[1], "w"))
PY
info "generated List: $((BULK + 1)) items, $(du -h "$W/bulk.json" | cut -f1)"
t0="$(now)"
applied="$(kc alice apply --server-side --field-manager=e2e -f "$W/bulk.json" -o name | wc -l)"
T_APPLY="$(since "$t0")"
info "kubectl apply --server-side -f bulk.json: $applied objects in ${T_APPLY}s"
[[ "$applied" == "$((BULK + 1))" ]] || fail "applied $applied objects, expected $((BULK + 1))"
t0="$(now)"
lines="$(kc alice get cm -A --chunk-size=500 | wc -l)"
T_LIST0="$(since "$t0")"
info "kubectl get cm -A --chunk-size=500 | wc -l = $lines in ${T_LIST0}s"
((lines >= BULK + 1)) || fail "listed $lines lines, expected at least $((BULK + 1))"
reqs="$(kc alice get cm -n e2e-bulk --chunk-size=500 -v=6 2>&1 >/dev/null | grep -c 'limit=500' || true)"
info "chunked: $reqs GET requests with limit=500 for one namespace of $BULK"
((reqs >= BULK / 500)) || fail "kubectl did not page ($reqs requests)"
count="$(kc alice get cm -n e2e-bulk --no-headers --chunk-size=500 | wc -l)"
[[ "$count" == "$BULK" ]] || fail "e2e-bulk has $count ConfigMaps, expected $BULK"
ok "$BULK ConfigMaps created and listed through the tunnel"

step "kubectl auth can-i follows the impersonated user's own RBAC"
can() { local u="$1"; shift; kc "$u" auth can-i "$@" 2>/dev/null || true; }
declare -A expect_can=(
    ["alice|create configmaps -n e2e-bulk"]=yes
    ["alice|list namespaces"]=yes
    ["alice|create clusterroles.rbac.authorization.k8s.io"]=no
    ["alice|get nodes"]=no
    ["bob|list namespaces"]=no
    ["bob|create configmaps -n e2e-bulk"]=no
)
for key in "alice|create configmaps -n e2e-bulk" "alice|list namespaces" "alice|create clusterroles.rbac.authorization.k8s.io" "alice|get nodes" "bob|list namespaces" "bob|create configmaps -n e2e-bulk"; do
    u="${key%%|*}"; q="${key#*|}"
    # shellcheck disable=SC2086
    got="$(can "$u" $q)"
    info "$(printf '%-6s can-i %-48s -> %-3s (expected %s)' "$u" "$q" "$got" "${expect_can[$key]}")"
    [[ "$got" == "${expect_can[$key]}" ]] || fail "$u can-i $q: got '$got'"
done
info "(the agent's service account could do all of these: the answers are the users' own)"
rc=0; kc bob get ns >/dev/null 2>"$W/bob.err" || rc=$?
[[ $rc != 0 ]] && grep -q 'User "bob" cannot list resource "namespaces"' "$W/bob.err" || fail "bob was not refused: $(cat "$W/bob.err")"
info "bob: kubectl get ns -> $(grep -m1 Error "$W/bob.err")"
ok "RBAC is the impersonated user's"

step "kubectl get --raw /version"
kc alice get --raw /version >"$W/version.json"
jq -c '{major, minor, gitVersion, goVersion, platform}' <"$W/version.json" | indent
[[ "$(jq -r .gitVersion "$W/version.json")" == v1.37.* ]] || fail "unexpected version"
kc alice get --raw "/api/v1/namespaces/e2e-bulk/configmaps?limit=1" | jq -c '{kind, items: [.items[].metadata.name], continue: (.metadata.continue != null)}' | indent

step "kubectl apply --dry-run=server of the project's deploy/ manifests, through the server"
# As the server's admin user, bound to cluster-admin downstream (alice's role cannot create
# RBAC objects). Server-side dry-run does not create namespaces: tunnel-system is created first.
kd create clusterrolebinding e2e-admin-cluster-admin --clusterrole=cluster-admin --user=e2e-admin | indent
ts kubeconfig e2e-downstream --user e2e-admin >"$W/e2e-admin.kubeconfig"
chmod 600 "$W/e2e-admin.kubeconfig"
kc e2e-admin apply -f "$REPO/deploy/server/base/namespace.yaml" | indent
kc e2e-admin apply -k "$REPO/deploy/server" --dry-run=server --validate=strict 2>&1 | indent
kc e2e-admin apply -f "$W/import.yaml" --dry-run=server --validate=strict 2>&1 | indent
n_server="$(kc e2e-admin apply -k "$REPO/deploy/server" --dry-run=server -o name | wc -l)"
n_import="$(kc e2e-admin apply -f "$W/import.yaml" --dry-run=server -o name | wc -l)"
info "accepted by the downstream apiserver: $n_server objects of deploy/server (kustomize), $n_import of the served import manifest"
((n_server >= 6 && n_import >= 10)) || fail "expected at least 6 + 10 objects"
ok "deploy/ manifests validate against the real apiserver through the tunnel"

step "Debian's kubectl ($(kubectl version --client -o json 2>/dev/null | jq -r .clientVersion.gitVersion)) with the same kubeconfig"
kc_distro alice get ns --no-headers | wc -l | xargs -I{} echo "        get ns: {} namespaces"
kc_distro alice -n e2e-bulk get cm cm-00042 -o jsonpath='{.data.index}{"\n"}' | sed 's/^/        get cm cm-00042: index=/'
rc=0; kc_distro alice get --raw /version >/dev/null 2>"$W/raw-distro.err" || rc=$?
if [[ $rc != 0 ]]; then
    info "get --raw /version: $(sed -n 1p "$W/raw-distro.err") (client releases before v1.34 send --raw paths to the server root, dropping the kubeconfig's /k8s/clusters/$CLUSTER_ID; kubernetes/kubernetes#131165)"
fi
ok "an older kubectl works for everything but --raw"

# =====================================================================================
part "Part 5: docker CLI through the server"
# =====================================================================================

step "docker CLI set-up (DOCKER_HOST=tcp://…/docker/nodes/$NODE_ID, TLS with the server CA, Bearer in config.json)"
mkdir -p "$W/docker-certs" "$W/docker-config"
cp "$W/server/ca.pem" "$W/docker-certs/ca.pem"
jq -n --arg t "Bearer $ALICE_TOKEN" '{HttpHeaders: {Authorization: $t}}' >"$W/docker-config/config.json"
info "DOCKER_HOST=tcp://$MGMT_IP:$SERVER_PORT/docker/nodes/$NODE_ID DOCKER_TLS_VERIFY=1 DOCKER_CERT_PATH=(ca.pem only) DOCKER_CONFIG=(HttpHeaders)"
dk version --format 'client {{.Client.Version}} (API {{.Client.APIVersion}}), server {{.Server.Version}} (API {{.Server.APIVersion}})' | indent
dk info --format 'name={{.Name}} containers={{.Containers}} images={{.Images}} driver={{.Driver}}' | indent

step "docker run of the busybox image (attached --rm, and detached)"
out="$(dk run --rm --network none "$IMAGE" echo hello-through-the-tunnel)"
info "docker run --rm: $out"
[[ "$out" == hello-through-the-tunnel ]] || fail "docker run printed '$out'"
dk run -d --name e2e-ticker --network none "$IMAGE" sh -c 'i=0; while :; do i=$((i+1)); echo tick-$i; sleep 0.5; done' | cut -c1-12 | indent
dk ps --format '{{.ID}} {{.Image}} {{.Status}} {{.Names}}' | indent
[[ -n "$(dk ps -q --filter name=e2e-ticker)" ]] || fail "e2e-ticker not running"

step "docker exec -it in a real terminal (tmux send-keys / capture-pane)"
tmux -L "$TMUX_SOCK" new-session -d -s exec -x 120 -y 30 \
    "$(dk_cmdline) exec -it e2e-ticker sh; echo docker-exit=\$?; sleep 60"
pane() { tmux -L "$TMUX_SOCK" capture-pane -p -t exec 2>/dev/null; }
pane_has() { [[ "$(pane)" == *"$1"* ]]; }
wait_until 15 "shell prompt" pane_has '/ #' || fail "no prompt: $(pane)"
info "prompt after ${WAITED}s"
tmux -L "$TMUX_SOCK" send-keys -t exec 'echo answer-$((6*7)); tty; stty size' Enter
wait_until 10 "answer" pane_has '/dev/pts/' || fail "no answer: $(pane)"
tmux -L "$TMUX_SOCK" send-keys -t exec 'sleep 100' Enter
sleep 1
tmux -L "$TMUX_SOCK" send-keys -t exec C-c
tmux -L "$TMUX_SOCK" send-keys -t exec 'echo after-ctrl-c' Enter
ctrl_c_done() { [[ "$(pane)" =~ (^|$'\n')after-ctrl-c ]]; }
wait_until 10 "Ctrl-C handled" ctrl_c_done || fail "Ctrl-C did not interrupt: $(pane)"
tmux -L "$TMUX_SOCK" send-keys -t exec 'exit' Enter
wait_until 10 "docker exits" pane_has 'docker-exit=' || fail "docker exec -it did not end: $(pane)"
pane | grep -v '^$' | indent
screen="$(pane)"
[[ "$screen" == *answer-42* && "$screen" == *docker-exit=0* && "$screen" =~ (^|$'\n')[0-9]+\ 120\ *($'\n'|$) ]] || fail "unexpected terminal contents"
tmux -L "$TMUX_SOCK" kill-session -t exec
ok "interactive exec: answer, /dev/pts tty with the terminal's 120 columns, Ctrl-C, exit status 0"

step "docker logs -f streams as the container writes"
bg_run logsf "" "$W/logs/logsf.log" bash -c "$(dk_cmdline) logs -f --tail 0 e2e-ticker | while IFS= read -r l; do printf '%s %s\n' \"\$(date +%s.%N)\" \"\$l\"; done >$W/logsf.out"
wait_until 15 "first followed line" test -s "$W/logsf.out" || fail "docker logs -f printed nothing"
n1="$(wc -l <"$W/logsf.out")"; sleep 3; n2="$(wc -l <"$W/logsf.out")"
gaps="$(awk 'NR>1 { g = $1 - p; if (g > m) m = g } { p = $1 } END { printf "%.2f", m }' "$W/logsf.out")"
info "lines: $n1 then $n2 three seconds later; largest gap between lines ${gaps}s (container writes every 0.5 s)"
tail -n 3 "$W/logsf.out" | indent
((n2 - n1 >= 4)) || fail "docker logs -f is not streaming"
fcmp "$gaps" '<' 1.5 || fail "docker logs -f stalls (gap ${gaps}s)"
alive logsf || fail "docker logs -f ended"
stop_bg logsf TERM 5
ok "docker logs -f follows"

step "docker cp both ways (4 MiB)"
head -c 4194304 /dev/urandom >"$W/blob"
sum="$(md5sum <"$W/blob" | cut -d' ' -f1)"
dk cp "$W/blob" e2e-ticker:/tmp/blob 2>&1 | indent
inside="$(dk exec e2e-ticker md5sum /tmp/blob | cut -d' ' -f1)"
dk cp e2e-ticker:/tmp/blob "$W/blob.back" 2>&1 | indent
back="$(md5sum <"$W/blob.back" | cut -d' ' -f1)"
info "md5 local $sum, in the container $inside, copied back $back"
[[ "$sum" == "$inside" && "$sum" == "$back" ]] || fail "docker cp corrupted data"
ok "docker cp in and out"

step "steady state: no streams left open, 3 sessions; baseline descriptors"
streams_drain
sessions_are 3 || fail "sessions: $(metric tunnel_server_sessions)"
FD_SERVER0="$(fd_count server)"
info "server pid $(pid_of server): $FD_SERVER0 fds, $(thread_count server) threads; cluster agent $(fd_count ca1) fds; node agent $(fd_count na1) fds"
ok "streams 0, sessions 3"

# =====================================================================================
part "Part 6: faults"
# =====================================================================================

step "NAT link cut for ${CUT_SECONDS}s: requests fail fast with 503, agents reconnect after, same kubeconfig works"
added0="$(metric tunnel_server_sessions_added_total)"
"$L/netns.sh" cut link 2>&1 | grep -E 'OK' | indent
T_CUT="$(now)"
probe_cut() {   # probe_cut: one k8s and one docker request through the server; prints a line
    local t k d
    t="$(since "$T_CUT")"
    local pk pd
    code_and_time "$ALICE_TOKEN" "/k8s/clusters/$CLUSTER_ID/version" 20 >"$W/cut.k" & pk=$!
    code_and_time "$ALICE_TOKEN" "/docker/nodes/$NODE_ID/_ping" 20 >"$W/cut.d" & pd=$!
    wait "$pk" "$pd" || true
    k="$(cat "$W/cut.k")"; d="$(cat "$W/cut.d")"
    printf '%s %s %s\n' "$t" "$k" "$d" | tee -a "$W/cut.samples" |
        awk '{ printf "        t=+%5.1fs  k8s /version -> %s in %.3fs   docker /_ping -> %s in %.3fs\n", $1, $2, $3, $4, $5 }'
}
: >"$W/cut.samples"
# Two long-lived requests from the first second of the cut, to see how the first ones end.
bg_run cutk8s "" "$W/logs/cutk8s.log" bash -c "$(declare -p W SERVER_URL NS_MGMT); $(declare -f sc inm code_and_time); code_and_time $ALICE_TOKEN /k8s/clusters/$CLUSTER_ID/version 80 >$W/cut.early.k8s"
bg_run cutdocker "" "$W/logs/cutdocker.log" bash -c "$(declare -p W SERVER_URL NS_MGMT); $(declare -f sc inm code_and_time); code_and_time $ALICE_TOKEN /docker/nodes/$NODE_ID/_ping 80 >$W/cut.early.docker"
for at in 1 5 10 20 30 45 60 75; do
    ((at < CUT_SECONDS)) || break
    while fcmp "$(since "$T_CUT")" '<' "$at"; do sleep 0.2; done
    probe_cut
done
t0="$(now)"
kerr="$(kc alice get ns --request-timeout=20s 2>&1 >/dev/null || true)"
info "kubectl get ns while cut ($(since "$t0")s): $(grep -m1 -E 'rror' <<<"$kerr" | cut -c1-200)"
# While cut, after the server's 15 s silence threshold: 503 at once.
bad="$(awk '$1 >= 20 && !($2 == 503 && $3 < 2 && $4 == 503 && $5 < 2)' "$W/cut.samples")"
[[ -z "$bad" ]] || fail "requests during the cut (after 20 s) were not fast 503s: $bad"
early="$(awk '$1 < 20 && !($2 == 503 && $3 < 2 && $4 == 503 && $5 < 2)' "$W/cut.samples")"
[[ -z "$early" ]] || warn "NOTE: in the first 20 s of the cut (before the tunnel counts as silent) requests were not all fast 503s (see the table)"
early_result() { if [[ -s "$1" ]]; then cat "$1"; else echo "still waiting"; fi; }
info "requests sent at +0s of the cut ended: k8s $(early_result "$W/cut.early.k8s"), docker $(early_result "$W/cut.early.docker") (status, seconds; 000 = no answer within 80 s)"
ok "while cut, once the tunnel counts as silent: fast 503s"
while fcmp "$(since "$T_CUT")" '<' "$CUT_SECONDS"; do sleep 0.5; done
"$L/netns.sh" restore 2>&1 | grep -E 'OK' | indent
T_RESTORE="$(now)"
info "link restored after $(awk -v a="$T_CUT" -v b="$T_RESTORE" 'BEGIN{printf "%.1f", b-a}')s"
limit=$((BACKOFF_CAP_S + 10))
# The server may still hold the old (silent) sessions: judge by real requests, not by the flags.
wait_until "$((limit + 20))" "kubectl works again" kube_works || fail "the same kubeconfig does not work $((limit + 20))s after the cut"
t_ca="$(since "$T_RESTORE")"
wait_until "$((limit + 20))" "docker works again" docker_works || fail "docker does not work $((limit + 20))s after the cut"
t_na="$(since "$T_RESTORE")"
both_connected() { cluster_connected && node_connected; }
wait_until "$((limit + 20))" "all three tunnels registered" both_connected || fail "server does not list both agents as connected"
t_all="$(since "$T_RESTORE")"
info "after restore: kubectl works again after ${t_ca}s, docker after ${t_na}s, all three tunnels (main, steve, node) after ${t_all}s (backoff cap ${BACKOFF_CAP_S}s; new sessions: $(( $(metric tunnel_server_sessions_added_total) - added0 )))"
for a in ca1 na1; do
    grep -hE 'disconnected|tunnel connected' "$W/logs/$a.log" | tail -n 2 | cut -c1-200 | sed "s/^/        $a: /"
done
fcmp "$t_ca" '<=' "$limit" && fcmp "$t_na" '<=' "$limit" && fcmp "$t_all" '<=' "$limit" || fail "recovery took longer than the backoff cap + 10 s ($limit s)"
kc alice get ns --no-headers | wc -l | xargs -I{} echo "        kubectl get ns (same kubeconfig): {} namespaces"
dk ps --format '{{.Names}} {{.Status}}' | indent
wait_until 60 "stale sessions removed" sessions_are 3 || fail "sessions after recovery: $(metric tunnel_server_sessions) (expected 3)"
info "server: $(metric tunnel_server_sessions) sessions, $(metric tunnel_server_streams) streams, $(fd_count server) fds (baseline $FD_SERVER0)"
ok "recovered from the cut"

step "kill -9 of the cluster agent: the other replica takes over at once; then a new one replaces the last"
start_cluster_agent ca2
wait_until 30 "second replica connected" sessions_are 5 || fail "second replica did not connect (sessions $(metric tunnel_server_sessions))"
info "replica ca2 (pid $(pid_of ca2)) connected in ${WAITED}s; sessions 5 (the server dials the newest: ca2)"
bg_run rawwatch "" "$W/logs/rawwatch.log" ip netns exec "$NS_MGMT" curl -sS -N --cacert "$W/server/ca.pem" \
    -H "Authorization: Bearer $ALICE_TOKEN" -o "$W/rawwatch.out" "$SERVER_URL/k8s/clusters/$CLUSTER_ID/api/v1/namespaces?watch=1"
wait_until 10 "raw watch streaming" test -s "$W/rawwatch.out" || fail "raw watch got nothing"
info "raw watch of namespaces running through ca2 (curl pid $(pid_of rawwatch))"
watch_pid="$(pid_of rawwatch)"
kill -KILL "$(pid_of ca2)"; T_KILL="$(now)"
info "kill -9 ca2 (pid $(pid_of ca2)), the replica carrying the traffic"
fails=0
for _ in 1 2 3 4 5; do kube_works >/dev/null 2>&1 || fails=$((fails + 1)); done
info "5 requests right after the kill: $fails failed ($(since "$T_KILL")s)"
((fails == 0)) || fail "requests failed while replica ca1 was still connected"
wait_until 10 "raw watch ends" bash -c "! kill -0 $watch_pid 2>/dev/null" || fail "a watch through the killed agent hangs"
info "the raw watch through ca2 ended $(since "$T_KILL")s after the kill: $(tr -d '\r' <"$W/logs/rawwatch.log" | sed -n 1p)"
wait_until 10 "ca2 sessions removed" sessions_are 3 || fail "the killed agent's sessions stay registered ($(metric tunnel_server_sessions))"
kill -KILL "$(pid_of ca1)"; T_KILL="$(now)"
info "kill -9 ca1 (pid $(pid_of ca1)), the last replica"
wait_until 10 "cluster tunnel gone" cluster_disconnected || fail "server still lists the cluster tunnel"
info "server dropped ca1's tunnel $(since "$T_KILL")s after the kill"
r="$(code_and_time "$ALICE_TOKEN" "/k8s/clusters/$CLUSTER_ID/version" 10)"
info "request with no cluster agent: $r (status, seconds); kubectl says: $(kc alice get ns >"$W/k.err" 2>&1; grep -m1 rror "$W/k.err" | cut -c1-160)"
[[ "${r%% *}" == 503 ]] && fcmp "${r#* }" '<' 1 || fail "expected a fast 503, got $r"
stop_bg ca1 KILL 2; stop_bg ca2 KILL 2; stop_bg rawwatch TERM 2
start_cluster_agent ca3; T_START="$(now)"
wait_until 30 "replacement agent connected" cluster_connected || fail "replacement agent did not connect"
wait_until 10 "kubectl works" kube_works || fail "kubectl fails with the replacement agent"
info "replacement ca3 (pid $(pid_of ca3)) serving in $(since "$T_START")s"
wait_until 10 "sessions" sessions_are 3 || fail "sessions: $(metric tunnel_server_sessions)"
info "open streams: $(streams_report)"
ok "takeover by the other replica without a failed request; replacement in seconds; nothing left open"

step "kill -9 of the node agent: docker fails fast, a new one takes over, containers unaffected"
kill -KILL "$(pid_of na1)"; T_KILL="$(now)"
info "kill -9 na1 (pid $(pid_of na1))"
wait_until 10 "node tunnel gone" node_disconnected || fail "server still lists the node tunnel"
r="$(code_and_time "$ALICE_TOKEN" "/docker/nodes/$NODE_ID/_ping" 10)"
info "docker /_ping with no node agent: $r; docker CLI says: $(dk ps 2>&1 | sed -n 1p | cut -c1-160)"
[[ "${r%% *}" == 503 ]] && fcmp "${r#* }" '<' 1 || fail "expected a fast 503, got $r"
stop_bg na1 KILL 2
start_node_agent na2; T_START="$(now)"
wait_until 30 "new node agent connected" node_connected || fail "new node agent did not connect"
wait_until 10 "docker works" docker_works || fail "docker fails with the new node agent"
info "na2 (pid $(pid_of na2)) serving in $(since "$T_START")s"
dk ps --format '{{.Names}} {{.Status}}' | indent
[[ -n "$(dk ps -q --filter name=e2e-ticker)" ]] || fail "e2e-ticker is gone"
wait_until 10 "sessions" sessions_are 3 || fail "sessions: $(metric tunnel_server_sessions)"
info "open streams: $(streams_report)"
ok "node agent replaced"

step "server restart: agents come back, records kept"
ts cluster list >"$W/clusters.before"; ts user list >"$W/users.before"
node_before="$(api "/v1/nodes/$NODE_ID" | jq -c '{id, clusterId, hostname, createdAt}')"
t0="$(now)"
stop_bg server TERM 20
info "server stopped (SIGTERM) in $(since "$t0")s; agents alive: ca3 $(alive ca3 && echo yes || echo NO), na2 $(alive na2 && echo yes || echo NO)"
alive ca3 && alive na2 || fail "an agent exited when the server went away"
r="$(code_and_time "$ALICE_TOKEN" "/k8s/clusters/$CLUSTER_ID/version" 5)"
info "while the server is down: $r (000 = connection refused)"
sleep 3
T_START="$(now)"
start_server
info "server up again in ${WAITED}s (pid $(pid_of server))"
wait_until "$((BACKOFF_CAP_S + 20))" "cluster agent back" cluster_connected || fail "cluster agent did not come back"
t_ca="$(since "$T_START")"
wait_until "$((BACKOFF_CAP_S + 20))" "node agent back" node_connected || fail "node agent did not come back"
info "agents back $(printf '%s' "$t_ca")s (cluster) and $(since "$T_START")s (node) after the restart"
ts cluster list >"$W/clusters.after"; ts user list >"$W/users.after"
diff "$W/clusters.before" "$W/clusters.after" >/dev/null || fail "cluster records changed: $(diff "$W/clusters.before" "$W/clusters.after")"
diff "$W/users.before" "$W/users.after" >/dev/null || fail "user records changed"
indent <"$W/clusters.after"
[[ "$(api "/v1/nodes/$NODE_ID" | jq -c '{id, clusterId, hostname, createdAt}')" == "$node_before" ]] || fail "node record changed"
wait_until 15 "kubectl works" kube_works || fail "alice's kubeconfig fails after the restart"
kc alice get ns --no-headers | wc -l | xargs -I{} echo "        alice's kubeconfig after the restart: {} namespaces"
[[ "$(can bob list namespaces)" == no ]] || fail "bob's RBAC changed"
wait_until 10 "docker works" docker_works || fail "docker fails after the restart"
dk ps --format '{{.Names}} {{.Status}}' | indent
wait_until 10 "sessions" sessions_are 3 || fail "sessions: $(metric tunnel_server_sessions)"
FD_SERVER1="$(fd_count server)"
ok "records, tokens and node kept; agents reconnected"

step "a slow reader (raw watch of $BULK ConfigMaps at 2 KB/s) does not hold up a large list beside it"
bg_run slowwatch "" "$W/logs/slowwatch.log" ip netns exec "$NS_MGMT" curl -sS -N --limit-rate 2k --cacert "$W/server/ca.pem" \
    -H "Authorization: Bearer $ALICE_TOKEN" -o "$W/slow.out" "$SERVER_URL/k8s/clusters/$CLUSTER_ID/api/v1/configmaps?watch=1"
wait_until 10 "slow watch streaming" test -s "$W/slow.out" || fail "slow watch got nothing"
sleep 4
s1="$(stat -c %s "$W/slow.out")"
info "slow reader has read $s1 bytes after ~4 s (the watch's initial events are ~$((BULK * 400 / 1024)) KiB: the rest waits in the tunnel)"
lat=()
t0="$(now)"
lines="$(kc alice get cm -A --chunk-size=500 | wc -l)"
T_LIST1="$(since "$t0")"
for _ in 1 2 3; do lat+=("$(code_and_time "$ALICE_TOKEN" "/k8s/clusters/$CLUSTER_ID/version" 10)"); done
info "list beside the slow reader: $lines lines in ${T_LIST1}s (alone: ${T_LIST0}s); /version: ${lat[*]}"
((lines >= BULK + 1)) || fail "list returned $lines lines"
alive slowwatch || fail "the slow watch died"
s2="$(stat -c %s "$W/slow.out")"
info "slow reader still reading: $s2 bytes so far"
fcmp "$T_LIST1" '<=' "$(awk -v a="$T_LIST0" 'BEGIN { print a * 2 + 5 }')" || fail "the list was held up: ${T_LIST1}s vs ${T_LIST0}s alone"
for x in "${lat[@]}"; do fcmp "${x#* }" '<' 1 || fail "/version took ${x#* }s beside the slow reader"; done
stop_bg slowwatch TERM 5
ok "the list and small requests were not held up by the slow stream"

step "nothing leaked: streams, sessions, descriptors"
streams_drain
info "server: $(metric tunnel_server_sessions) sessions, $(metric tunnel_server_streams) streams, $(fd_count server) fds (after restart $FD_SERVER1), $(thread_count server) threads"
info "cluster agent ca3: $(fd_count ca3) fds; node agent na2: $(fd_count na2) fds"
sessions_are 3 || fail "leftover sessions: $(metric tunnel_server_sessions)"
(($(fd_count server) <= FD_SERVER1 + 10)) || fail "server descriptors grew: $(fd_count server) vs $FD_SERVER1"
metrics | grep -E '^tunnel_server_(dials_total|proxied_requests_total\{kind="(k8s|docker)".*status="(200|503)")' | indent
ok "no leaks"

part "done"

#!/usr/bin/env bash
# The deploy/ suite, for real and without a registry or a kubelet:
#
#   1. a private dockerd (tests/e2e/lib/dockerd.sh), the three images from deploy/images/build.sh,
#      each started read-only, without capabilities, as its default user (--version), sizes;
#   2. a real kube-apiserver + etcd on loopback (tests/e2e/lib/kube-apiserver.sh);
#   3. tunnel-server from its image, run as deploy/server/base/deployment.yaml describes it
#      (pod2docker.py plays the kubelet: env from the ConfigMap, security context, fsGroup on the
#      PVC directory, probes); the import manifest is rendered by that server;
#   4. every manifest through `kubectl apply --dry-run=server --validate=strict`, one object at a
#      time, with Pod Security "restricted" warnings reported per object;
#   5. the import manifest applied to the apiserver, the cluster agent run from its image as the
#      Deployment describes it (service-account token of SA cattle, the credentials Secret), the
#      cluster Connected and kubectl working through the server;
#   6. the node agent run from its image as the DaemonSet describes it (host network, uid 0
#      without capabilities, the "host" /var/run with the Docker socket, read-only), and
#      `docker ps` through the server's /docker/nodes/<id> route listing it.
#
#   deploy/test/deploy-test.sh
#
# Needs root, docker.io (dockerd, containerd, runc, docker), kubectl, curl, jq, openssl,
# python3 with PyYAML, and the kube-apiserver/etcd of tests/e2e/lib/build-k8s.sh (built on first
# use: ~12 min once, then cached in ~/.cache/tunnel-e2e). Missing docker is a failure, not a skip.
#
# Environment: IMAGE_PROFILE (debug: the binaries `cargo test` just built; release), BUILD_CARGO
# (build.sh --cargo: auto), DEPLOY_TEST_STATE (default: a fresh /tmp/tunnel-deploy-test.XXXXXX),
# DEPLOY_TEST_KEEP=1 (leave everything running for a look; stop it with `deploy-test.sh down DIR`),
# DEPLOY_TEST_BUILD_K8S=0 (fail instead of building kube-apiserver when it is not cached).
# Network: loopback only (containers use the host network of this machine's root namespace and
# listen on 127.0.0.1 ports chosen free at run time).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
. "$repo/tests/e2e/lib/common.sh"
_tpe2e_name=deploy-test

PROFILE="${IMAGE_PROFILE:-debug}"
BUILD_CARGO="${BUILD_CARGO:-auto}"
CLUSTER_NAME=deploy-e2e
NODE_NAME=deploy-e2e-node
C_SERVER=deploy-e2e-tunnel-server
C_CLUSTER=deploy-e2e-cluster-agent
C_NODE=deploy-e2e-node-agent

# --- down: stop what a kept run left -------------------------------------------------------
teardown() {
    local st="$1"
    [[ -d "$st" ]] || return 0
    if [[ -S "$st/docker/docker.sock" ]]; then
        local ids
        ids="$(docker -H "unix://$st/docker/docker.sock" ps -aq --filter label=tunnel-deploy-test 2>/dev/null || true)"
        # shellcheck disable=SC2086
        [[ -z "$ids" ]] || timeout 60 docker -H "unix://$st/docker/docker.sock" rm -f $ids >/dev/null 2>&1 || true
    fi
    [[ -d "$st/docker" ]] && { "$repo/tests/e2e/lib/dockerd.sh" purge "$st/docker" >/dev/null 2>&1 || warn "dockerd purge failed"; }
    [[ -d "$st/k8s" ]] && { "$repo/tests/e2e/lib/kube-apiserver.sh" purge "$st/k8s" >/dev/null 2>&1 || warn "kube-apiserver purge failed"; }
    rm -rf "$st"
}
if [[ "${1:-}" == down ]]; then
    teardown "${2:?usage: deploy-test.sh down DIR}"
    exit 0
fi

d() { docker -H "unix://$STATE/docker/docker.sock" "$@"; }
k() { kubectl --kubeconfig "$STATE/k8s/admin.kubeconfig" "$@"; }

passed=0
pass() { passed=$((passed + 1)); ok "$* [${SECONDS}s]"; }
finish() {
    local rc=$?
    set +e
    if ((rc != 0)) && [[ -n "${STATE:-}" && -d "${STATE:-}" ]]; then
        for c in "$C_SERVER" "$C_CLUSTER" "$C_NODE"; do
            if d ps -a --format '{{.Names}}' 2>/dev/null | grep -qx "$c"; then
                printf '\n[deploy-test] --- last log lines of %s\n' "$c" >&2
                d logs --tail 25 "$c" 2>&1 | sed 's/^/    /' >&2
            fi
        done
    fi
    if [[ "${DEPLOY_TEST_KEEP:-0}" == 1 && -n "${STATE:-}" ]]; then
        info "kept: $STATE (DOCKER_HOST=unix://$STATE/docker/docker.sock; stop: $0 down $STATE)"
    elif [[ -n "${STATE:-}" ]]; then
        teardown "$STATE"
    fi
    if ((rc == 0)); then
        printf '\ndeploy-test: %d passed, 0 failed\n' "$passed"
    else
        printf '\ndeploy-test: %d passed, 1 failed\n' "$passed"
    fi
    exit "$rc"
}
trap finish EXIT

# --- 0. what the suite needs ---------------------------------------------------------------
step "prerequisites"
[[ "$(id -u)" == 0 ]] || die "must run as root (starts dockerd, etcd, kube-apiserver)"
for c in dockerd containerd runc docker; do
    command -v "$c" >/dev/null 2>&1 ||
        die "'$c' not found: this suite needs a real Docker engine (Debian: apt-get install docker.io; scripts/install-test-deps.sh does it)"
done
for c in kubectl curl jq openssl python3 setsid nsenter ldd objcopy tar; do
    command -v "$c" >/dev/null 2>&1 || die "'$c' not found"
done
python3 -c 'import yaml' 2>/dev/null || die "python3 has no yaml module (Debian: apt-get install python3-yaml)"
eval "$("$repo/tests/e2e/lib/build-k8s.sh" paths)"
if [[ ! -x "$KUBE_APISERVER" || ! -x "$ETCD" ]]; then
    [[ "${DEPLOY_TEST_BUILD_K8S:-1}" == 1 ]] || die "kube-apiserver/etcd not cached (run tests/e2e/lib/build-k8s.sh)"
    info "kube-apiserver/etcd not cached: building them once (tests/e2e/lib/build-k8s.sh, ~12 min)"
    "$repo/tests/e2e/lib/build-k8s.sh" all
fi
STATE="${DEPLOY_TEST_STATE:-$(mktemp -d /tmp/tunnel-deploy-test.XXXXXX)}"
mkdir -p "$STATE"
ok "root, docker $(dockerd --version | sed 's/Docker version //'), kubectl, python3-yaml; state in $STATE"

export DOCKER_HOST="unix://$STATE/docker/docker.sock"

# probe KIND JSON: one kubelet-style probe (HTTP(S) GET, any 2xx/3xx), from pod2docker's output.
probe() {
    local p url
    p="$(jq -c --arg k "$1" '.probes[$k]' <<<"$2")"
    [[ "$p" != null ]] || return 0
    url="$(jq -r '"\(.scheme)://\(.host):\(.port)\(.path)"' <<<"$p")"
    curl -ks --max-time 3 -o /dev/null -w '%{http_code}' "$url" | grep -q '^[23]'
}
probe_url() { jq -r --arg k "$1" '.probes[$k] | "\(.scheme)://\(.host):\(.port)\(.path)"' <<<"$2"; }

# run_pod NAME JSON: docker run with pod2docker's arguments.
run_pod() {
    local -a args
    mapfile -t args < <(jq -r '.args[]' <<<"$2")
    info "docker ${args[*]}"
    d "${args[@]}" >/dev/null
}

# --- 1. images ------------------------------------------------------------------------------
step "private dockerd and the images (deploy/images/build.sh --profile $PROFILE)"
"$repo/tests/e2e/lib/dockerd.sh" start "$STATE/docker" >/dev/null
"$repo/deploy/images/build.sh" --profile "$PROFILE" --cargo "$BUILD_CARGO" | tee "$STATE/images.txt"
for n in tunnel-server cattle-cluster-agent cattle-node-agent; do
    img="tunnel-project/$n:dev"
    cfg="$(d image inspect -f '{{.Config.User}} {{json .Config.Entrypoint}}' "$img")"
    [[ "$cfg" == "65532:65532 [\"/usr/local/bin/$n\"]" ]] || die "$img: user/entrypoint $cfg"
    out="$(timeout 30 docker -H "$DOCKER_HOST" run --rm --network none --read-only --cap-drop ALL \
        --security-opt no-new-privileges "$img" --version 2>"$STATE/run.err")" ||
        die "$img --version failed: $out $(cat "$STATE/run.err")"
    [[ "$out" == "$n "* ]] || die "$img --version said: $out"
    files="$(d create --name "probe-$n" "$img" >/dev/null 2>&1 && d export "probe-$n" | tar -t | sort; d rm "probe-$n" >/dev/null)"
    for f in etc/ssl/certs/ca-certificates.crt etc/passwd lib64/ld-linux-x86-64.so.2 "usr/local/bin/$n"; do
        grep -qx "\(\./\)\?$f" <<<"$files" || die "$img lacks /$f"
    done
    info "$img: $(grep -c . <<<"$files") entries; runs as 65532, read-only, no capabilities: $out"
done
pass "three images built without a registry; each starts as non-root on a read-only root filesystem"

# --- 2. kube-apiserver ------------------------------------------------------------------------
step "kube-apiserver + etcd on loopback"
"$repo/tests/e2e/lib/kube-apiserver.sh" start "$STATE/k8s" >"$STATE/k8s-start.log" 2>&1 ||
    { tail -n 20 "$STATE/k8s-start.log" >&2; die "kube-apiserver did not start"; }
# shellcheck disable=SC1091
. "$STATE/k8s/env"
pass "kube-apiserver $(k version -o json 2>/dev/null | jq -r .serverVersion.gitVersion) ready at $APISERVER_URL"

# --- 3. the server, as deploy/server/base/deployment.yaml runs it ----------------------------------
step "tunnel-server from its image, as deploy/server/base/deployment.yaml describes it"
SPORT="$(free_port 127.0.0.1)"
SURL="https://127.0.0.1:$SPORT"
mkdir -p "$STATE/volumes" "$STATE/server-data"
server_json="$(python3 "$here/pod2docker.py" \
    --manifest "$repo/deploy/server/base/deployment.yaml" --manifest "$repo/deploy/server/base/configmap.yaml" \
    --kind Deployment --name tunnel-server --docker-name "$C_SERVER" --volumes-dir "$STATE/volumes" \
    --network host --set-arg="--listen=127.0.0.1:$SPORT" --env "SERVER_URL=$SURL" \
    --pvc "tunnel-server-data=$STATE/server-data" --port-remap "8443=$SPORT")"
run_pod "$C_SERVER" "$server_json"
wait_for 30 "server startup probe $(probe_url startup "$server_json")" probe startup "$server_json" ||
    die "the server's startup probe never passed"
{ probe liveness "$server_json" && probe readiness "$server_json"; } || die "liveness/readiness probe failed"
srv() { d exec "$C_SERVER" tunnel-server "$@"; }
out="$(srv cluster add "$CLUSTER_NAME")"
import_url="$(sed -n 's/^ *kubectl apply -f //p' <<<"$out")"
[[ "$import_url" == "$SURL/v3/import/"*".yaml" ]] || die "no import command in: $out"
file="${import_url##*/}"; file="${file%.yaml}"
CLUSTER_ID="${file##*_}"
ADMIN_TOKEN="$(srv user add admin --admin | sed -n 's/^API token (shown once): //p')"
[[ -n "$ADMIN_TOKEN" ]] || die "no admin token"
cp "$STATE/server-data/ca.pem" "$STATE/ca.pem"
curl -sf --cacert "$STATE/ca.pem" "$import_url?nodeAgent=true" -o "$STATE/import.yaml" || die "GET $import_url failed"
info "user $(d inspect -f '{{.Config.User}}' "$C_SERVER"), read-only $(d inspect -f '{{.HostConfig.ReadonlyRootfs}}' "$C_SERVER"); cluster $CLUSTER_ID; import manifest $(wc -l <"$STATE/import.yaml") lines"
pass "server up from its image under the Deployment's security context; probes pass; import manifest rendered"

# --- 4. dry-run every manifest against the real apiserver -------------------------------------
step "kubectl apply --dry-run=server --validate=strict, one object at a time"
# Server-side dry-run does not create namespaces, and namespaced objects need theirs: create the
# two for real first (from the manifests themselves). cattle-system also gets a test-only
# "warn: restricted" label so the Pod Security verdict of each workload is reported.
k apply -f "$repo/deploy/server/base/namespace.yaml" >/dev/null
python3 - "$STATE/import.yaml" <<'PY' | k apply -f - >/dev/null
import sys, yaml
ns = [o for o in yaml.safe_load_all(open(sys.argv[1])) if o and o["kind"] == "Namespace"]
yaml.safe_dump_all(ns, sys.stdout)
PY
k label --overwrite ns cattle-system pod-security.kubernetes.io/warn=restricted >/dev/null
k kustomize "$repo/deploy/server" >"$STATE/server.yaml"
mkdir -p "$STATE/objects"
python3 - "$STATE/objects" "$STATE/server.yaml" "$STATE/import.yaml" <<'PY'
import os, sys, yaml
n = 0
for path in sys.argv[2:]:
    for o in yaml.safe_load_all(open(path)):
        if not o:
            continue
        n += 1
        md = o["metadata"]
        name = f"{n:02d}-{os.path.basename(path)[:-5]}-{o['kind']}-{md.get('namespace', '')}-{md['name']}.yaml"
        with open(os.path.join(sys.argv[1], name), "w") as f:
            yaml.safe_dump(o, f)
PY
dry_fail=0
for f in "$STATE"/objects/*.yaml; do
    obj="$(basename "$f" .yaml)"
    if out="$(k apply --dry-run=server --validate=strict -f "$f" 2>&1)"; then
        warnings="$(grep -i '^Warning' <<<"$out" || true)"
        printf '[deploy-test]     %-70s %s\n' "$obj" "$(grep -v '^Warning' <<<"$out" | sed -n 1p)"
        if [[ -n "$warnings" ]]; then
            sed 's/^/[deploy-test]         /' <<<"$warnings"
            case "$obj" in
                *-DaemonSet-cattle-system-cattle-node-agent) ;;   # host network + hostPath + uid 0: by design
                *) warn "$obj: unexpected warning"; dry_fail=1 ;;
            esac
        fi
    else
        printf '[deploy-test]     %-70s REJECTED\n%s\n' "$obj" "$out"
        dry_fail=1
    fi
done
((dry_fail == 0)) || die "a manifest was rejected or warned about unexpectedly"
pass "$(find "$STATE/objects" -name '*.yaml' | wc -l) objects accepted by kube-apiserver $(k version -o json 2>/dev/null | jq -r .serverVersion.gitVersion) (server dry-run, strict field validation); only the node agent's DaemonSet falls outside Pod Security 'restricted'"

# --- 5. the cluster agent, as the import manifest's Deployment runs it -------------------------
step "cluster agent from its image, as the import manifest's Deployment describes it"
k apply -f "$STATE/import.yaml" >"$STATE/apply.txt" 2>&1
info "applied for real: $(grep -c created "$STATE/apply.txt") objects (no kubelet here: nothing runs them)"
# The kubelet's service-account volume: a bound token of SA cattle, the cluster CA, the namespace.
mkdir -p "$STATE/sa"
k create token cattle -n cattle-system --duration=1h >"$STATE/sa/token"
cp "$CA_CERT" "$STATE/sa/ca.crt"
printf cattle-system >"$STATE/sa/namespace"
chmod 0644 "$STATE"/sa/*
# The server impersonates its user "admin" downstream; the lone apiserver has no such user yet.
k create clusterrolebinding deploy-e2e-admin --clusterrole=cluster-admin --user=admin >/dev/null
HPORT="$(free_port 127.0.0.1)"
cluster_json="$(python3 "$here/pod2docker.py" --manifest "$STATE/import.yaml" \
    --kind Deployment --name cattle-cluster-agent --docker-name "$C_CLUSTER" --volumes-dir "$STATE/volumes" \
    --network host --sa-dir "$STATE/sa" \
    --env "KUBERNETES_SERVICE_HOST=$APISERVER_IP" --env "KUBERNETES_SERVICE_PORT=$APISERVER_PORT" \
    --env "CATTLE_AGENT_HEALTH_ADDR=127.0.0.1:$HPORT" --port-remap "9090=$HPORT")"
run_pod "$C_CLUSTER" "$cluster_json"
wait_for 60 "cluster agent readiness $(probe_url readiness "$cluster_json")" probe readiness "$cluster_json" ||
    die "the cluster agent never became ready"
probe liveness "$cluster_json" || die "cluster agent liveness probe failed"
connected() {
    curl -sf --cacert "$STATE/ca.pem" -H "Authorization: Bearer $ADMIN_TOKEN" "$SURL/v1/clusters/$CLUSTER_ID" |
        jq -e '.connected == true and .tunnel == true' >/dev/null
}
wait_for 60 "cluster $CLUSTER_ID connected" connected || die "cluster $CLUSTER_ID never showed connected"
info "cluster: $(curl -sf --cacert "$STATE/ca.pem" -H "Authorization: Bearer $ADMIN_TOKEN" "$SURL/v1/clusters/$CLUSTER_ID" |
    jq -c '{id, apiEndpoint, tunnel, aggregationTunnel, connected}')"
info "agent container: user $(d inspect -f '{{.Config.User}}' "$C_CLUSTER") + groups $(d inspect -f '{{json .HostConfig.GroupAdd}}' "$C_CLUSTER"), read-only $(d inspect -f '{{.HostConfig.ReadonlyRootfs}}' "$C_CLUSTER"), caps dropped $(d inspect -f '{{json .HostConfig.CapDrop}}' "$C_CLUSTER"), memory limit $(d inspect -f '{{.HostConfig.Memory}}' "$C_CLUSTER")"
pass "cluster agent ready (readiness probe) and the cluster shows connected"

step "kubectl through tunnel-server"
srv kubeconfig "$CLUSTER_NAME" --user admin >"$STATE/through.kubeconfig"
kt() { timeout 30 kubectl --kubeconfig "$STATE/through.kubeconfig" "$@"; }
kt config view -o jsonpath='{.clusters[0].cluster.server}' | sed 's/^/[deploy-test]     server: /'; echo
who="$(kt auth whoami -o jsonpath='{.status.userInfo.username}')"
[[ "$who" == admin ]] || die "kubectl auth whoami through the server said '$who', expected admin (impersonated)"
kt get ns -o name | sed 's/^/[deploy-test]     /'
kt get ns cattle-system -o name >/dev/null || die "kubectl get ns through the server failed"
kt get secret -n cattle-system stv-aggregation -o name >/dev/null ||
    die "no stv-aggregation Secret: the agent did not write it through the API"
info "stv-aggregation written by the agent: keys $(k get secret -n cattle-system stv-aggregation -o json | jq -c '.data | keys')"
pass "kubectl through the server: whoami=admin (impersonated), get ns, the agent's stv-aggregation Secret"

# --- 6. the node agent, as the DaemonSet runs it; docker ps through the tunnel ----------------
step "node agent from its image, as the import manifest's DaemonSet describes it"
# The node's /var/run: a directory holding (a hard link to) this dockerd's socket.
mkdir -p "$STATE/node-var-run"
ln -f "$STATE/docker/docker.sock" "$STATE/node-var-run/docker.sock"
NPORT="$(free_port 127.0.0.1)"
node_json="$(python3 "$here/pod2docker.py" --manifest "$STATE/import.yaml" \
    --kind DaemonSet --name cattle-node-agent --docker-name "$C_NODE" --volumes-dir "$STATE/volumes" \
    --field "spec.nodeName=$NODE_NAME" --field "status.hostIP=127.0.0.1" \
    --host-path "/var/run=$STATE/node-var-run" \
    --env "CATTLE_AGENT_HEALTH_ADDR=127.0.0.1:$NPORT" --port-remap "9091=$NPORT")"
run_pod "$C_NODE" "$node_json"
wait_for 60 "node agent readiness $(probe_url readiness "$node_json")" probe readiness "$node_json" ||
    die "the node agent never became ready"
probe liveness "$node_json" || die "node agent liveness probe failed"
node_id() {
    curl -sf --cacert "$STATE/ca.pem" -H "Authorization: Bearer $ADMIN_TOKEN" "$SURL/v1/nodes?cluster=$CLUSTER_ID" |
        jq -er --arg h "$NODE_NAME" '.items[] | select(.hostname == $h and .connected) | .id'
}
wait_for 30 "node $NODE_NAME connected" node_id || die "node $NODE_NAME never showed connected"
NODE_ID="$(node_id)"
info "node: $(curl -sf --cacert "$STATE/ca.pem" -H "Authorization: Bearer $ADMIN_TOKEN" "$SURL/v1/nodes/$NODE_ID" |
    jq -c '(.params.node // .params) as $p | {id, hostname, connected, address: $p.customConfig.address, docker: $p.dockerInfo.ServerVersion}')"
pass "node agent ready and node $NODE_ID connected"

step "docker ps through the server's /docker/nodes/$NODE_ID route"
mkdir -p "$STATE/docker-client/certs"
cp "$STATE/ca.pem" "$STATE/docker-client/certs/ca.pem"
jq -n --arg t "Bearer $ADMIN_TOKEN" '{HttpHeaders: {Authorization: $t}}' >"$STATE/docker-client/config.json"
dt() {
    DOCKER_HOST="tcp://127.0.0.1:$SPORT/docker/nodes/$NODE_ID" DOCKER_TLS_VERIFY=1 \
        DOCKER_CERT_PATH="$STATE/docker-client/certs" DOCKER_CONFIG="$STATE/docker-client" \
        timeout 30 docker "$@"
}
ps_out="$(dt ps --format '{{.Names}}\t{{.Image}}\t{{.Status}}')" || die "docker ps through the tunnel failed"
sed 's/^/[deploy-test]     /' <<<"$ps_out"
grep -q "^$C_NODE	tunnel-project/cattle-node-agent:dev	Up" <<<"$ps_out" ||
    die "docker ps through the tunnel does not list $C_NODE"
sec="$(dt inspect -f 'user={{.Config.User}} readonly={{.HostConfig.ReadonlyRootfs}} privileged={{.HostConfig.Privileged}} capdrop={{json .HostConfig.CapDrop}} network={{.HostConfig.NetworkMode}}' "$C_NODE")"
info "$C_NODE (inspected through the tunnel): $sec"
[[ "$sec" == 'user=0:0 readonly=true privileged=false capdrop=["ALL"] network=host' ]] ||
    die "the node agent does not run with the DaemonSet's security context: $sec"
pass "docker ps through the tunnel lists the node agent; it runs as uid 0 without capabilities, read-only, unprivileged"

# --- resource use, then a graceful stop -------------------------------------------------------
step "memory use and SIGTERM"
for c in "$C_SERVER" "$C_CLUSTER" "$C_NODE"; do
    pid="$(d inspect -f '{{.State.Pid}}' "$c")"
    info "$c: $(awk '/^VmRSS|^VmHWM/ { printf "%s %s %s  ", $1, $2, $3 }' "/proc/$pid/status")(limit $(d inspect -f '{{.HostConfig.Memory}}' "$c" | awk '{ print $1 / 1048576 }') MiB)"
done
for c in "$C_NODE" "$C_CLUSTER" "$C_SERVER"; do
    t0=$SECONDS
    d stop -t 30 "$c" >/dev/null
    rc="$(d inspect -f '{{.State.ExitCode}}' "$c")"
    info "$c: exit $rc after SIGTERM in $((SECONDS - t0)) s"
    [[ "$rc" == 0 ]] || die "$c exited $rc on SIGTERM"
done
pass "all three stop with exit 0 on SIGTERM (what a pod deletion sends)"

#!/usr/bin/env bash
# A REAL two-node Kubernetes cluster behind the NAT router of netns.sh:
#
#     tpe2e-mgmt ---- tpe2e-nat (router, NAT) ---- downstream LAN 10.213.1.0/24 (bridge in tpe2e-lan)
#                                                    |                         |
#                                      tpe2e-down 10.213.1.2          tpe2e-worker 10.213.1.3
#                                      node tpe2e-cp (control plane)  node tpe2e-worker
#                                      etcd, kube-apiserver,          dockerd, cri-dockerd,
#                                      kube-controller-manager,       kubelet, kube-proxy
#                                      kube-scheduler, dockerd,       pods 10.42.x.0/24 (cni0)
#                                      cri-dockerd, kubelet,
#                                      kube-proxy, pods 10.42.y.0/24 (cni0)
#
#   tests/e2e/lib/cluster.sh up              netns.sh up, LAN + worker namespace, control plane,
#                                            both nodes; ends with `verify` (idempotent)
#   tests/e2e/lib/cluster.sh verify          evidence: nodes Ready, a pod per node, pod -> pod
#                                            across nodes, ClusterIP Service, HTTPS to
#                                            kubernetes.default.svc with the SA token, SA token
#                                            Secret filled, kubectl logs / exec
#   tests/e2e/lib/cluster.sh status          processes, nodes, pods
#   tests/e2e/lib/cluster.sh lan             only the network: netns.sh up + LAN + worker namespace
#   tests/e2e/lib/cluster.sh down            stop everything, delete the namespaces (keeps state)
#   tests/e2e/lib/cluster.sh purge           down, then delete $CLUSTER_DIR
#   tests/e2e/lib/cluster.sh load-image IMAGE [SRC_DOCKER_HOST]
#                                            docker save IMAGE (from SRC, default the first
#                                            node's dockerd) | docker load into every node
#   tests/e2e/lib/cluster.sh load-tar FILE   docker load FILE into every node
#   tests/e2e/lib/cluster.sh env             print the cluster's variables (also in $CLUSTER_DIR/env)
#   tests/e2e/lib/cluster.sh kubectl ARGS... admin kubectl inside the downstream namespace
#   tests/e2e/lib/cluster.sh kubelet-stop|kubelet-start cp|worker
#                                            stop / start one node's kubelet (fault tests)
#
# Runtime: cri-dockerd over one private dockerd per node (dockerd.sh), RKE-style: the pods are
# containers of the node's Docker, which is what the node agent talks to. CNI: Debian's
# containernetworking-plugins (bridge + host-local + loopback + portmap), one /24 per node from
# kube-controller-manager's node IPAM, static routes between the nodes over the LAN. kube-proxy
# in iptables mode. No cluster DNS: pods that need kubernetes.default.svc by name get it
# through hostAliases (the verify pod does).
#
# Environment: E2E_STATE (default /tmp/tpe2e), CLUSTER_DIR (default $E2E_STATE/cluster),
# TPE2E_PREFIX (default tpe2e; names of namespaces, interfaces, nodes, cgroups),
# CLUSTER_WAIT (default 180 s, bound of each wait for readiness), E2E_IMAGE
# (default tpe2e/busybox:latest), PAUSE_IMAGE (default tpe2e/pause:3.10).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,43p' "$0"; exit "${1:-2}"; }

L="$E2E_LIB_DIR"
P="${TPE2E_PREFIX:-tpe2e}"
E2E_STATE="${E2E_STATE:-/tmp/tpe2e}"
C="${CLUSTER_DIR:-$E2E_STATE/cluster}"
WAIT="${CLUSTER_WAIT:-180}"
IMAGE="${E2E_IMAGE:-tpe2e/busybox:latest}"
PAUSE_IMAGE="${PAUSE_IMAGE:-tpe2e/pause:3.10}"

NS_MGMT="$P-mgmt"; NS_NAT="$P-nat"; NS_DOWN="$P-down"; NS_LAN="$P-lan"; NS_WORKER="$P-worker"
NAT_DOWN_IP=10.213.1.1; MGMT_IP=10.213.0.1; NAT_MGMT_IP=10.213.0.254
LAN_BR="$P-br"
# LAN ports in $NS_LAN: the router's link (netns.sh's $P-d0 moved here and renamed), and one
# veth per node.
LAN_UPLINK="$P-lu"; LAN_CP_PORT="$P-lc"; LAN_WORKER_PORT="$P-lw"
IF_DOWN="$P-d0"; IF_WORKER="$P-w0"
CLUSTER_CIDR=10.42.0.0/16
SERVICE_CIDR=10.43.0.0/16
SERVICE_IP=10.43.0.1

# Nodes: name netns ip interface
NODES=(cp worker)
node_name() { echo "$P-$1"; }
node_ns() { if [[ "$1" == cp ]]; then echo "$NS_DOWN"; else echo "$NS_WORKER"; fi; }
node_ip() { if [[ "$1" == cp ]]; then echo 10.213.1.2; else echo 10.213.1.3; fi; }
node_dir() { echo "$C/nodes/$1"; }
node_sock() { echo "$(node_dir "$1")/docker/docker.sock"; }

K8S="$C/k8s"          # kube-apiserver.sh DIR (etcd + apiserver + PKI + admin kubeconfig)
PKI="$K8S/pki"
mkdir -p "$C"
LOGS="$C/logs"

eval "$("$L/build-k8s.sh" paths)"
export KUBECTL   # kube-apiserver.sh's wrapper runs the v1.37.2 kubectl we built

k() { "$K8S/kubectl" "$@"; }
nsx() { local ns="$1"; shift; ip netns exec "$ns" "$@"; }
ns_exists() { [[ -e "/run/netns/$1" ]]; }
dk() { local n="$1"; shift; timeout 120 docker -H "unix://$(node_sock "$n")" "$@"; }

# bg NODE_NS PIDFILE LOG CMD...: start CMD detached in the namespace, record its pid.
bg() {
    local ns="$1" pidfile="$2" log="$3"; shift 3
    echo "=== $(date -u +%FT%TZ) start: $*" >>"$log"
    setsid nsenter --net="/run/netns/$ns" "$@" >>"$log" 2>&1 </dev/null &
    echo $! >"$pidfile"
}

# ---------------------------------------------------------------- network

lan_configured() {
    ns_exists "$NS_LAN" && ns_exists "$NS_WORKER" && ns_exists "$NS_DOWN" || return 1
    local port
    for port in "$LAN_UPLINK" "$LAN_CP_PORT" "$LAN_WORKER_PORT"; do
        ip -n "$NS_LAN" -o link show "$port" 2>/dev/null | grep "master $LAN_BR" >/dev/null || return 1
    done
    ip -n "$NS_DOWN" -4 -o addr show dev "$IF_DOWN" 2>/dev/null | grep " $(node_ip cp)/24" >/dev/null || return 1
    ip -n "$NS_WORKER" -4 -o addr show dev "$IF_WORKER" 2>/dev/null | grep " $(node_ip worker)/24" >/dev/null || return 1
    ip -n "$NS_WORKER" route show default | grep "via $NAT_DOWN_IP" >/dev/null || return 1
}

# kill_ns_pids NS: TERM (then KILL) what still runs in a namespace we own.
kill_ns_pids() {
    local ns="$1" pids pid
    pids="$(ip netns pids "$ns" 2>/dev/null || true)"
    [[ -n "$pids" ]] || return 0
    for pid in $pids; do
        info "$ns: TERM pid $pid ($(tr '\0' ' ' </proc/"$pid"/cmdline 2>/dev/null | cut -c1-80))"
        kill -TERM "$pid" 2>/dev/null || true
    done
    local deadline=$((SECONDS + 10))
    while (( SECONDS < deadline )) && [[ -n "$(ip netns pids "$ns" 2>/dev/null)" ]]; do sleep 0.2; done
    for pid in $(ip netns pids "$ns" 2>/dev/null); do
        warn "$ns: KILL pid $pid"; kill -KILL "$pid" 2>/dev/null || true
    done
}

lan_down() {
    local ns
    for ns in "$NS_WORKER" "$NS_LAN"; do
        ns_exists "$ns" || continue
        kill_ns_pids "$ns"
        ip netns del "$ns"
        ok "$ns deleted"
    done
}

# netns.sh joins the router and the downstream host with one veth pair. A second node needs
# a LAN: the downstream end of that pair moves into $NS_LAN as the uplink port of a bridge
# (a switch, nothing else runs there), and each node gets a veth to the bridge. The router's
# side ($P-d1, 10.213.1.1, its NAT and inbound-drop rules) is untouched, and the downstream
# host keeps $IF_DOWN with 10.213.1.2/24 and its default route, so `netns.sh check` and
# `netns.sh status` still see the topology as configured.
lan_up() {
    step "downstream LAN: bridge $LAN_BR in $NS_LAN, worker namespace $NS_WORKER ($(node_ip worker))"
    if lan_configured; then ok "already configured"; return 0; fi
    if ! ns_exists "$NS_DOWN" || ! ns_exists "$NS_NAT"; then die "run netns.sh up first"; fi
    lan_down   # a partial or stale one (e.g. after netns.sh down/up)
    ip -n "$NS_DOWN" link show "$IF_DOWN" >/dev/null 2>&1 || die "$NS_DOWN has no $IF_DOWN"
    ip netns add "$NS_LAN"
    nsx "$NS_LAN" ip link set lo up
    # A switch: bridged frames must not go through iptables in this namespace.
    nsx "$NS_LAN" sysctl -qw net.bridge.bridge-nf-call-iptables=0 net.bridge.bridge-nf-call-ip6tables=0 2>/dev/null || true
    ip -n "$NS_LAN" link add "$LAN_BR" type bridge
    ip -n "$NS_LAN" link set "$LAN_BR" up
    # the router's link: move the downstream end of netns.sh's veth into the switch
    ip -n "$NS_DOWN" link set "$IF_DOWN" netns "$NS_LAN"
    ip -n "$NS_LAN" link set "$IF_DOWN" name "$LAN_UPLINK"
    ip -n "$NS_LAN" link set "$LAN_UPLINK" master "$LAN_BR" up
    info "$NS_NAT $P-d1 ($NAT_DOWN_IP) <-> $LAN_UPLINK (bridge port)"
    # the control-plane host, same interface name and address as before
    ip link add "$IF_DOWN" netns "$NS_DOWN" type veth peer name "$LAN_CP_PORT" netns "$NS_LAN"
    ip -n "$NS_LAN" link set "$LAN_CP_PORT" master "$LAN_BR" up
    ip -n "$NS_DOWN" addr add "$(node_ip cp)/24" dev "$IF_DOWN"
    ip -n "$NS_DOWN" link set "$IF_DOWN" up
    ip -n "$NS_DOWN" route add default via "$NAT_DOWN_IP"
    info "$NS_DOWN $IF_DOWN=$(node_ip cp) <-> $LAN_CP_PORT (bridge port), default via $NAT_DOWN_IP"
    # the worker host
    ip netns add "$NS_WORKER"
    nsx "$NS_WORKER" ip link set lo up
    ip link add "$IF_WORKER" netns "$NS_WORKER" type veth peer name "$LAN_WORKER_PORT" netns "$NS_LAN"
    ip -n "$NS_LAN" link set "$LAN_WORKER_PORT" master "$LAN_BR" up
    ip -n "$NS_WORKER" addr add "$(node_ip worker)/24" dev "$IF_WORKER"
    ip -n "$NS_WORKER" link set "$IF_WORKER" up
    ip -n "$NS_WORKER" route add default via "$NAT_DOWN_IP"
    info "$NS_WORKER $IF_WORKER=$(node_ip worker) <-> $LAN_WORKER_PORT (bridge port), default via $NAT_DOWN_IP"
    lan_configured || die "LAN incomplete after setup"
    # the bridge learns/forwards within a second or two of the ports coming up
    wait_for 10 "worker reaches the router" nsx "$NS_WORKER" busybox ping -c1 -W1 "$NAT_DOWN_IP" ||
        die "worker cannot reach the router $NAT_DOWN_IP"
    wait_for 10 "worker reaches the control-plane host" nsx "$NS_WORKER" busybox ping -c1 -W1 "$(node_ip cp)" ||
        die "worker cannot reach $(node_ip cp)"
    ok "LAN up: router, $(node_ip cp) and $(node_ip worker) on one bridge"
}

# Node network settings that Kubernetes needs, all per network namespace.
node_sysctls() {
    local ns; ns="$(node_ns "$1")"
    # forwarding for the pods; bridged pod traffic through iptables, so a pod reaching a
    # Service whose endpoint is on the same bridge gets its reply un-DNATed (kube-proxy).
    nsx "$ns" sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1 \
        net.bridge.bridge-nf-call-ip6tables=1
}

# ---------------------------------------------------------------- PKI

# cert NAME CN O KIND [SAN]: NAME.crt/.key signed by the apiserver's CA (KIND client|server).
cert() {
    local name="$1" cn="$2" o="$3" kind="$4" san="${5:-}"
    [[ -s "$PKI/$name.crt" ]] && return 0
    local ext="$PKI/$name.ext" subj="/CN=$cn"
    [[ -z "$o" ]] || subj="/O=$o/CN=$cn"
    {
        echo "basicConstraints=CA:FALSE"
        echo "keyUsage=critical,digitalSignature,keyEncipherment"
        if [[ "$kind" == server ]]; then echo "extendedKeyUsage=serverAuth"; else echo "extendedKeyUsage=clientAuth"; fi
        [[ -z "$san" ]] || echo "subjectAltName=$san"
    } >"$ext"
    openssl req -newkey rsa:2048 -nodes -keyout "$PKI/$name.key" -out "$PKI/$name.csr" -subj "$subj" 2>/dev/null
    openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
        -days 3650 -sha256 -extfile "$ext" -out "$PKI/$name.crt" 2>/dev/null
    chmod 600 "$PKI/$name.key"
    info "issued $name.crt (CN=$cn${o:+, O=$o})"
}

# kubeconfig FILE CERTNAME: a kubeconfig for the apiserver with that client certificate.
kubeconfig() {
    local f="$1" name="$2"
    cat >"$f" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: $P
  cluster:
    server: $APISERVER_URL
    certificate-authority: $PKI/ca.crt
users:
- name: $name
  user:
    client-certificate: $PKI/$name.crt
    client-key: $PKI/$name.key
contexts:
- name: $P
  context: {cluster: $P, user: $name}
current-context: $P
EOF
    chmod 600 "$f"
}

pki_up() {
    step "certificates for the control plane, kubelets and kube-proxy"
    cert kube-controller-manager system:kube-controller-manager "" client
    cert kube-scheduler system:kube-scheduler "" client
    cert kube-proxy system:kube-proxy "" client
    local n
    for n in "${NODES[@]}"; do
        mkdir -p "$(node_dir "$n")"
        cert "kubelet-$n" "system:node:$(node_name "$n")" system:nodes client
        # serving certificate: the apiserver checks it (--kubelet-certificate-authority)
        cert "kubelet-$n-serving" "$(node_name "$n")" "" server "DNS:$(node_name "$n"),IP:$(node_ip "$n")"
    done
    kubeconfig "$C/kube-controller-manager.kubeconfig" kube-controller-manager
    kubeconfig "$C/kube-scheduler.kubeconfig" kube-scheduler
    kubeconfig "$C/kube-proxy.kubeconfig" kube-proxy
    for n in "${NODES[@]}"; do kubeconfig "$(node_dir "$n")/kubelet.kubeconfig" "kubelet-$n"; done
    ok "PKI in $PKI"
}

# ---------------------------------------------------------------- control plane

healthz() {   # healthz NS URL
    [[ "$(nsx "$1" curl -sk --max-time 3 "$2" 2>/dev/null)" == ok ]]
}

start_component() {   # start_component NAME URL CMD...
    local name="$1" url="$2"; shift 2
    local pidfile="$C/$name.pid" log="$LOGS/$name.log"
    if pid_alive "$pidfile" && healthz "$NS_DOWN" "$url"; then ok "$name already running (pid $(cat "$pidfile"))"; return 0; fi
    if pid_alive "$pidfile"; then stop_pidfile "$pidfile" "$name" 15; fi
    local t0=$SECONDS
    bg "$NS_DOWN" "$pidfile" "$log" "$@"
    local deadline=$((SECONDS + WAIT))
    while (( SECONDS < deadline )); do
        healthz "$NS_DOWN" "$url" && { ok "$name pid $(cat "$pidfile") healthy in $((SECONDS - t0))s"; return 0; }
        pid_alive "$pidfile" || { tail -n 20 "$log" >&2; die "$name exited (log $log)"; }
        sleep 0.5
    done
    tail -n 20 "$log" >&2
    die "$name not healthy after ${WAIT}s (log $log)"
}

control_plane_up() {
    step "etcd + kube-apiserver in $NS_DOWN (kube-apiserver.sh)"
    # Busybox's own TLS client (all a busybox pod has for https) sends no signature_algorithms
    # extension, which in TLS 1.2 leaves the server only SHA-1 signatures; Go 1.25+ refuses
    # those unless GODEBUG=tlssha1=1 (RFC 9155). It only changes what a client that offers
    # no signature algorithms gets; TLS 1.3 clients (kubectl, curl, Go) are unaffected.
    GODEBUG="tlssha1=1${GODEBUG:+,$GODEBUG}" SERVICE_CIDR="$SERVICE_CIDR" \
        "$L/kube-apiserver.sh" start "$K8S" "$NS_DOWN" | sed 's/^/    /'
    # shellcheck disable=SC1091
    . "$K8S/env"
    pki_up

    step "kube-controller-manager (service-account token controller, node IPAM $CLUSTER_CIDR)"
    # shellcheck disable=SC2054
    start_component kube-controller-manager https://127.0.0.1:10257/healthz \
        "$KUBE_CONTROLLER_MANAGER" \
        --kubeconfig="$C/kube-controller-manager.kubeconfig" \
        --authentication-kubeconfig="$C/kube-controller-manager.kubeconfig" \
        --authorization-kubeconfig="$C/kube-controller-manager.kubeconfig" \
        --bind-address=127.0.0.1 --secure-port=10257 \
        --service-account-private-key-file="$PKI/sa.key" \
        --root-ca-file="$PKI/ca.crt" \
        --use-service-account-credentials=true \
        --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
        --allocate-node-cidrs=true --cluster-cidr="$CLUSTER_CIDR" --node-cidr-mask-size=24 \
        --service-cluster-ip-range="$SERVICE_CIDR" \
        --leader-elect=false --controllers='*' --v=1

    step "kube-scheduler"
    start_component kube-scheduler https://127.0.0.1:10259/healthz \
        "$KUBE_SCHEDULER" \
        --kubeconfig="$C/kube-scheduler.kubeconfig" \
        --authentication-kubeconfig="$C/kube-scheduler.kubeconfig" \
        --authorization-kubeconfig="$C/kube-scheduler.kubeconfig" \
        --bind-address=127.0.0.1 --secure-port=10259 --leader-elect=false --v=1
}

# ---------------------------------------------------------------- nodes

# The pause image: pause.c from the k8s.io/kubernetes module source (already in the Go module
# cache, the build downloaded it), compiled statically, imported as a one-file image.
make_pause_image() {
    local n="$1" src bin="$C/pause/pause"
    if [[ "$(dk "$n" image inspect --format '{{.Comment}}' "$PAUSE_IMAGE" 2>/dev/null || true)" == "tpe2e pause "* ]]; then
        return 0
    fi
    if [[ ! -x "$bin" ]]; then
        need_cmd gcc go
        src="$(go env GOMODCACHE)/k8s.io/kubernetes@$K8S_VERSION/build/pause/linux/pause.c"
        [[ -s "$src" ]] || die "no $src (run build-k8s.sh first; it downloads the module)"
        mkdir -p "$C/pause/root"
        gcc -Os -static -DVERSION="$K8S_VERSION-tpe2e" -o "$bin" "$src"
        strip "$bin" 2>/dev/null || true
        cp "$bin" "$C/pause/root/pause"
    fi
    tar -C "$C/pause/root" --numeric-owner --owner=0 --group=0 -cf - . |
        dk "$n" import --message "tpe2e pause $(sha256sum "$bin" | cut -c1-16)" \
            --change 'ENTRYPOINT ["/pause"]' - "$PAUSE_IMAGE" >/dev/null
    info "$(node_name "$n"): imported $PAUSE_IMAGE ($(stat -c %s "$bin") bytes, static)"
}

# cgroup v1 (hybrid) here: each kubelet gets its own cgroup root /$P-NODE in every hierarchy,
# so the two kubelets never manage each other's pods (and nothing outside them).
cgroup_root() { echo "/$(node_name "$1")"; }
make_cgroup_root() {
    local root h; root="$(cgroup_root "$1")"
    for h in /sys/fs/cgroup/*/; do
        [[ -e "$h/cgroup.procs" ]] || continue
        mkdir -p "$h$root"
        if [[ -e "$h/cpuset.cpus" && ! -s "$h$root/cpuset.cpus" ]]; then
            cat "$h/cpuset.cpus" >"$h$root/cpuset.cpus"
            cat "$h/cpuset.mems" >"$h$root/cpuset.mems"
        fi
    done
}
remove_cgroup_root() {
    local root h d; root="$(cgroup_root "$1")"
    for h in /sys/fs/cgroup/*/; do
        [[ -d "$h$root" ]] || continue
        while read -r d; do rmdir "$d" 2>/dev/null || true; done < <(find "$h$root" -depth -type d 2>/dev/null)
    done
}

# write_if_changed FILE < CONTENT: replace FILE only when CONTENT differs (keeps its mtime).
write_if_changed() {
    local f="$1"
    cat >"$f.new"
    if cmp -s "$f.new" "$f"; then rm -f "$f.new"; else mv "$f.new" "$f"; fi
}

write_node_config() {
    local n="$1" d ns ip name cidr
    d="$(node_dir "$n")"; ns="$(node_ns "$n")"; ip="$(node_ip "$n")"; name="$(node_name "$n")"
    mkdir -p "$d/kubelet" "$d/pod-logs" "$d/cni/net.d" "$d/cni/cache" "$d/cni/ipam" "$d/cri-dockerd"
    # No nameserver outside our namespaces may ever be asked: pods get a resolv.conf that
    # points at their own loopback (nothing answers; names fail fast) unless they set
    # hostAliases. There is no cluster DNS.
    printf '# tpe2e: no cluster DNS, never the host resolvers\nnameserver 127.0.0.1\noptions ndots:1 timeout:1 attempts:1\n' >"$d/resolv.conf"
    write_if_changed "$d/kubelet-config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine has cgroup v1 (hybrid); kubelets since 1.35 refuse it unless told.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: $(cgroup_root "$n")
cgroupsPerQOS: true
enforceNodeAllocatable: [pods]
containerRuntimeEndpoint: unix://$d/cri-dockerd.sock
imageServiceEndpoint: unix://$d/cri-dockerd.sock
address: $ip
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: $PKI/kubelet-$n-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-$n-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization:
  mode: Webhook
clusterDomain: cluster.local
resolvConf: $d/resolv.conf
podLogsDir: $d/pod-logs
# Our images exist only locally (no registry is reachable): never garbage-collect them,
# and no disk-pressure eviction on a shared machine's disk.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "50Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
failSwapOn: false
# protectKernelDefaults=false makes the kubelet set vm.overcommit_memory, kernel.panic,
# kernel.panic_on_oops, ...: host-global sysctls. It runs in a private mount namespace where
# those /proc/sys files are bind-mounted copies (see start_kubelet), so the host keeps its own.
protectKernelDefaults: false
serializeImagePulls: false
maxPods: 50
featureGates:
  # cri-dockerd answers Exec/Attach/PortForward with a streaming URL without a scheme
  # ("//127.0.0.1:10010/cri/exec/..."). The kubelet's SPDY proxy defaults it to http, but its
  # WebSocket translator (this gate, beta and on since 1.36) dials it as https and fails with
  # "http: server gave HTTP response to HTTPS client". Off, the node does not declare the
  # feature, and the apiserver translates kubectl's WebSocket to SPDY itself.
  ExtendWebSocketsToKubelet: false
nodeStatusUpdateFrequency: 5s
EOF
    # kube-proxy exits when its config file changes: rewrite it only when the content does
    write_if_changed "$d/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
hostnameOverride: $name
clusterCIDR: $CLUSTER_CIDR
clientConnection:
  kubeconfig: $C/kube-proxy.kubeconfig
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# conntrack sysctls are host-global: leave them as they are (0 = do not touch).
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
iptables:
  localhostNodePorts: false
# NodePorts on the node's own LAN address only
nodePortAddresses: [primary]
EOF
}

# CNI config for the node's pod CIDR (assigned by kube-controller-manager when the node
# registers): a bridge cni0, host-local addresses, portmap; loopback is set up by cri-dockerd.
write_cni_config() {
    local n="$1" cidr="$2" d; d="$(node_dir "$n")"
    cat >"$d/cni/net.d/10-$P.conflist.tmp" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "$P-pods",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$cidr"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$d/cni/ipam"
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
    mv "$d/cni/net.d/10-$P.conflist.tmp" "$d/cni/net.d/10-$P.conflist"
}

# Without CAP_SYS_RESOURCE (this machine's root lacks it) runc cannot give pod sandboxes the
# oom_score_adj -998 cri-dockerd asks for, and no pod starts: see runc-oom-clamp.sh.
has_cap_sys_resource() {
    local eff; eff="$(awk '/^CapEff:/ {print $2}' /proc/self/status)"
    (( (16#$eff >> 24) & 1 ))
}

# --root-dir is a shared bind mount, so the volumes the kubelet mounts below it reach dockerd.
# Made before dockerd starts: dockerd has its own mount namespace (below), a copy of the host's
# taken at its start, and the host's / is private, so only mounts under an existing shared one
# propagate into it.
kubelet_root_mount() {
    local d; d="$(node_dir "$1")"
    mkdir -p "$d/kubelet"
    if ! awk -v p="$d/kubelet" '$5 == p && / shared:/ {f=1} END {exit !f}' /proc/self/mountinfo; then
        mount --bind "$d/kubelet" "$d/kubelet"
        mount --make-shared "$d/kubelet"
    fi
}

# Each node has its own /var/run (DIR/nodes/NODE/run, holding that node's docker.sock): dockerd
# runs with it bind-mounted on /run in a private mount namespace, so a pod's hostPath /var/run
# (the node agent's DaemonSet) is the node's own, as on a real machine.
start_dockerd() {
    local n="$1" d; d="$(node_dir "$n")"
    local extra="${DOCKERD_EXTRA_ARGS:-}"
    kubelet_root_mount "$n"
    if ! has_cap_sys_resource; then
        extra+=" --add-runtime tpe2e-runc=$L/runc-oom-clamp.sh --default-runtime tpe2e-runc"
        info "no CAP_SYS_RESOURCE here: dockerd runs runc through runc-oom-clamp.sh (negative oom_score_adj -> 0)"
    fi
    DOCKERD_RUN_DIR="$d/run" DOCKERD_EXTRA_ARGS="$extra" "$L/dockerd.sh" start "$d/docker" "$(node_ns "$n")" | grep -E 'OK|FAIL|WARN|info:' | sed 's/^/    /' || true
    "$L/dockerd.sh" status "$d/docker" >/dev/null || die "dockerd of $(node_name "$n") does not answer"
    "$L/busybox-image.sh" "$(node_sock "$n")" "$IMAGE" | grep -E 'OK|FAIL' | sed 's/^/    /' || true
    make_pause_image "$n"
}

start_cri_dockerd() {
    local n="$1" d; d="$(node_dir "$n")"
    local pidfile="$d/cri-dockerd.pid" sock="$d/cri-dockerd.sock"
    if pid_alive "$pidfile" && [[ -S "$sock" ]]; then ok "cri-dockerd already running (pid $(cat "$pidfile"))"; return 0; fi
    [[ -x "$CRI_DOCKERD" ]] || die "no cri-dockerd at $CRI_DOCKERD (run build-k8s.sh cri-dockerd)"
    rm -f "$sock"
    bg "$(node_ns "$n")" "$pidfile" "$LOGS/cri-dockerd-$n.log" "$CRI_DOCKERD" \
        --container-runtime-endpoint "unix://$sock" \
        --docker-endpoint "unix://$(node_sock "$n")" \
        --cri-dockerd-root-directory "$d/cri-dockerd" \
        --pod-infra-container-image "$PAUSE_IMAGE" \
        --network-plugin cni --cni-bin-dir /usr/lib/cni \
        --cni-conf-dir "$d/cni/net.d" --cni-cache-dir "$d/cni/cache" \
        --streaming-bind-addr 127.0.0.1:10010 \
        --hairpin-mode hairpin-veth
    wait_for 30 "cri-dockerd socket" test -S "$sock" ||
        { tail -n 20 "$LOGS/cri-dockerd-$n.log" >&2; die "cri-dockerd of $(node_name "$n") did not start"; }
    ok "cri-dockerd pid $(cat "$pidfile") on $sock"
}

# The kubelet runs in the node's network namespace and in a private mount namespace. In that
# mount namespace the host-global kernel tunables it insists on setting are bind-mounted
# files (it "sets" them there), and the node directory is a shared mount, so the volumes the
# kubelet mounts below it (service-account tokens, configmaps) propagate to the host mount
# namespace where dockerd bind-mounts them into the containers.
start_kubelet() {
    local n="$1" d ns; d="$(node_dir "$n")"; ns="$(node_ns "$n")"
    local pidfile="$d/kubelet.pid"
    if pid_alive "$pidfile" && healthz "$ns" http://127.0.0.1:10248/healthz; then
        ok "kubelet already running (pid $(cat "$pidfile"))"; return 0
    fi
    if pid_alive "$pidfile"; then stop_pidfile "$pidfile" kubelet 15; fi
    make_cgroup_root "$n"
    kubelet_root_mount "$n"
    local tun="$d/kernel-tunables" f
    mkdir -p "$tun"
    local tunables=(vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops
        kernel/keys/root_maxkeys kernel/keys/root_maxbytes)
    local binds=""
    for f in "${tunables[@]}"; do
        cat "/proc/sys/$f" >"$tun/${f//\//.}"
        binds+="mount --bind $tun/${f//\//.} /proc/sys/$f; "
    done
    bg "$ns" "$pidfile" "$LOGS/kubelet-$n.log" unshare --mount --propagation unchanged -- bash -c \
        "set -e; mount --make-rprivate /proc; $binds exec \"\$0\" \"\$@\"" \
        "$KUBELET" --config="$d/kubelet-config.yaml" --kubeconfig="$d/kubelet.kubeconfig" \
        --root-dir="$d/kubelet" --cert-dir="$d/kubelet/pki" \
        --hostname-override="$(node_name "$n")" --node-ip="$(node_ip "$n")" --v=1
    local t0=$SECONDS deadline=$((SECONDS + WAIT))
    while (( SECONDS < deadline )); do
        healthz "$ns" http://127.0.0.1:10248/healthz && break
        pid_alive "$pidfile" || { tail -n 25 "$LOGS/kubelet-$n.log" >&2; die "kubelet of $(node_name "$n") exited"; }
        sleep 0.5
    done
    healthz "$ns" http://127.0.0.1:10248/healthz || { tail -n 25 "$LOGS/kubelet-$n.log" >&2; die "kubelet not healthy"; }
    ok "kubelet pid $(cat "$pidfile") healthy in $((SECONDS - t0))s"
}

node_pod_cidr() { k get node "$(node_name "$1")" -o jsonpath='{.spec.podCIDR}' 2>/dev/null; }

start_kube_proxy() {
    local n="$1" d ns; d="$(node_dir "$n")"; ns="$(node_ns "$n")"
    local pidfile="$d/kube-proxy.pid"
    if pid_alive "$pidfile" && livez_proxy "$ns"; then ok "kube-proxy already running (pid $(cat "$pidfile"))"; return 0; fi
    if pid_alive "$pidfile"; then stop_pidfile "$pidfile" kube-proxy 15; fi
    bg "$ns" "$pidfile" "$LOGS/kube-proxy-$n.log" "$KUBE_PROXY" --config="$d/kube-proxy.yaml" --v=1
    wait_for "$WAIT" "kube-proxy healthz" healthz_proxy "$ns" ||
        { tail -n 20 "$LOGS/kube-proxy-$n.log" >&2; die "kube-proxy of $(node_name "$n") not healthy"; }
    ok "kube-proxy pid $(cat "$pidfile") healthy (iptables mode)"
}
healthz_proxy() { nsx "$1" curl -sf --max-time 3 http://127.0.0.1:10256/healthz >/dev/null 2>&1; }
livez_proxy() { nsx "$1" curl -sf --max-time 3 http://127.0.0.1:10256/livez >/dev/null 2>&1; }

node_up() {
    local n="$1" name; name="$(node_name "$n")"
    step "node $name in $(node_ns "$n") ($(node_ip "$n")): dockerd, images, cri-dockerd"
    mkdir -p "$(node_dir "$n")"
    node_sysctls "$n"
    write_node_config "$n"
    start_dockerd "$n"
    start_cri_dockerd "$n"

    step "node $name: kubelet (registers the node; pod CIDR from kube-controller-manager)"
    start_kubelet "$n"
    local cidr=""
    local deadline=$((SECONDS + WAIT))
    while (( SECONDS < deadline )); do
        cidr="$(node_pod_cidr "$n" || true)"
        [[ -n "$cidr" ]] && break
        sleep 1
    done
    [[ -n "$cidr" ]] || die "node $name has no pod CIDR after ${WAIT}s"
    write_cni_config "$n" "$cidr"
    echo "$cidr" >"$(node_dir "$n")/pod-cidr"
    ok "node $name registered, pod CIDR $cidr (CNI config written)"

    step "node $name: kube-proxy"
    start_kube_proxy "$n"
    # Pods leaving the cluster network (e.g. to the management host) go out with the node's
    # address; pod-to-pod and pod-to-node traffic keeps pod addresses.
    local ns; ns="$(node_ns "$n")"
    nsx "$ns" iptables -w 5 -t nat -C POSTROUTING -s "$CLUSTER_CIDR" ! -d "$CLUSTER_CIDR" -m comment --comment "$P-pod-egress" -j MASQUERADE 2>/dev/null ||
        nsx "$ns" iptables -w 5 -t nat -A POSTROUTING -s "$CLUSTER_CIDR" ! -d "$CLUSTER_CIDR" -m comment --comment "$P-pod-egress" -j MASQUERADE
}

# Static routes: each node's pod CIDR via that node's LAN address.
pod_routes() {
    step "routes between the nodes' pod CIDRs over the LAN"
    local a b cidr
    for a in "${NODES[@]}"; do
        for b in "${NODES[@]}"; do
            [[ "$a" == "$b" ]] && continue
            cidr="$(cat "$(node_dir "$b")/pod-cidr")"
            ip -n "$(node_ns "$a")" route replace "$cidr" via "$(node_ip "$b")"
            info "$(node_name "$a"): $cidr via $(node_ip "$b")"
        done
    done
    ok "routes set"
}

# node_ready_since NODE EPOCH: Ready=True, reported by a heartbeat at or after EPOCH (a node
# object kept in etcd from an earlier run still says Ready until it times out).
node_ready_since() {
    local hb st
    IFS=' ' read -r st hb < <(k get node "$1" -o jsonpath='{range .status.conditions[?(@.type=="Ready")]}{.status} {.lastHeartbeatTime}{end}' 2>/dev/null; echo) || true
    [[ "$st" == True && -n "$hb" ]] && (( $(date -d "$hb" +%s) >= $2 ))
}

wait_nodes_ready() {
    step "both nodes Ready (wait <= ${WAIT}s)"
    local n t0=$SECONDS
    for n in "${NODES[@]}"; do
        wait_for "$WAIT" "node $(node_name "$n") Ready" node_ready_since "$(node_name "$n")" "$UP_EPOCH" ||
            { k describe node "$(node_name "$n")" | tail -n 30 >&2; die "node $(node_name "$n") not Ready"; }
    done
    k label node "$(node_name cp)" node-role.kubernetes.io/control-plane= --overwrite >/dev/null
    ok "nodes Ready in $((SECONDS - t0))s"
    k get nodes -o wide | sed 's/^/        /'
}

write_env() {
    {
        echo "# generated by tests/e2e/lib/cluster.sh up"
        echo "CLUSTER_DIR=$C"
        echo "NS_CP=$NS_DOWN"
        echo "NS_WORKER=$NS_WORKER"
        echo "NODE_CP=$(node_name cp)"
        echo "NODE_WORKER=$(node_name worker)"
        echo "CP_IP=$(node_ip cp)"
        echo "WORKER_IP=$(node_ip worker)"
        echo "DOCKER_SOCK_CP=$(node_sock cp)"
        echo "DOCKER_SOCK_WORKER=$(node_sock worker)"
        echo "APISERVER_URL=$APISERVER_URL"
        echo "APISERVER_IP=$APISERVER_IP"
        echo "APISERVER_PORT=$APISERVER_PORT"
        echo "APISERVER_CA=$PKI/ca.crt"
        echo "ADMIN_KUBECONFIG=$K8S/admin.kubeconfig"
        echo "ADMIN_TOKEN_FILE=$K8S/admin.token"
        echo "KUBECTL_DOWN=$K8S/kubectl"
        echo "CLUSTER_CIDR=$CLUSTER_CIDR"
        echo "SERVICE_CIDR=$SERVICE_CIDR"
        echo "E2E_IMAGE=$IMAGE"
        echo "PAUSE_IMAGE=$PAUSE_IMAGE"
    } >"$C/env"
}

do_up() {
    need_root
    need_cmd ip nsenter unshare setsid openssl curl docker iptables busybox gcc
    local t0=$SECONDS
    mkdir -p "$LOGS"
    [[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local && -x /usr/lib/cni/loopback && -x /usr/lib/cni/portmap ]] ||
        die "CNI plugins missing in /usr/lib/cni (apt-get install containernetworking-plugins, or deps.sh)"
    local b
    for b in "$KUBE_CONTROLLER_MANAGER" "$KUBE_SCHEDULER" "$KUBELET" "$KUBE_PROXY" "$CRI_DOCKERD"; do
        [[ -x "$b" ]] || die "missing $b (run: tests/e2e/lib/build-k8s.sh all)"
    done
    step "network namespaces (netns.sh up)"
    "$L/netns.sh" up | sed 's/^/    /'
    lan_up
    control_plane_up
    # heartbeats from now on count (kubelets post their status every 5 s)
    UP_EPOCH=$(($(date +%s) - 10))
    local n
    for n in "${NODES[@]}"; do node_up "$n"; done
    pod_routes
    wait_nodes_ready
    write_env
    ok "cluster up in $((SECONDS - t0))s; environment in $C/env, logs in $LOGS"
    do_verify
}

# ---------------------------------------------------------------- verify

VNS=tpe2e-smoke
# Busybox 1.35 (Debian) wget segfaults with -T: the pods bound it with busybox timeout instead.
do_verify() {
    [[ -s "$K8S/env" ]] || die "cluster not started"
    # shellcheck disable=SC1091
    . "$K8S/env"
    local t0=$SECONDS cp worker
    cp="$(node_name cp)"; worker="$(node_name worker)"

    step "verify: kubectl get nodes -o wide"
    k get nodes -o wide | sed 's/^/        /'

    step "verify: namespace $VNS, a busybox pod on each node (scheduled by kube-scheduler via nodeSelector)"
    k create namespace "$VNS" --dry-run=client -o yaml | k apply -f - >/dev/null
    wait_for 60 "default ServiceAccount in $VNS (serviceaccount controller)" k -n "$VNS" get serviceaccount default ||
        die "no default ServiceAccount: is kube-controller-manager running?"
    # fresh pods every time (after a down/up the old ones would only show restarts)
    k -n "$VNS" delete pod bb-cp bb-worker --ignore-not-found --wait=true --timeout=60s | sed 's/^/        /'
    local n
    for n in cp worker; do
        cat <<EOF | k apply -f - | sed 's/^/        /'
apiVersion: v1
kind: Pod
metadata:
  name: bb-$n
  namespace: $VNS
  labels: {app: bb, node: $n}
spec:
  nodeSelector: {kubernetes.io/hostname: $(node_name "$n")}
  terminationGracePeriodSeconds: 1
  # no cluster DNS: the apiserver's Service names, for the HTTPS check
  hostAliases:
  - ip: $SERVICE_IP
    hostnames: [kubernetes, kubernetes.default, kubernetes.default.svc, kubernetes.default.svc.cluster.local]
  containers:
  - name: bb
    image: $IMAGE
    imagePullPolicy: Never
    command: [sh, -c, 'mkdir -p /www && echo "hello from \$(hostname) on \$NODE" >/www/index.html && echo "bb-$n started on \$NODE" && exec httpd -f -v -p 8080 -h /www']
    env:
    - {name: NODE, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}
    ports: [{containerPort: 8080}]
EOF
    done
    if ! k -n "$VNS" wait --for=condition=Ready pod/bb-cp pod/bb-worker --timeout="${WAIT}s" >/dev/null; then
        k -n "$VNS" describe pods | tail -n 40 >&2
        die "pods not Ready"
    fi
    k -n "$VNS" get pods -o wide | sed 's/^/        /'
    local ip_cp ip_worker node_of_cp node_of_worker
    ip_cp="$(k -n "$VNS" get pod bb-cp -o jsonpath='{.status.podIP}')"
    ip_worker="$(k -n "$VNS" get pod bb-worker -o jsonpath='{.status.podIP}')"
    node_of_cp="$(k -n "$VNS" get pod bb-cp -o jsonpath='{.spec.nodeName}')"
    node_of_worker="$(k -n "$VNS" get pod bb-worker -o jsonpath='{.spec.nodeName}')"
    [[ "$node_of_cp" == "$cp" && "$node_of_worker" == "$worker" ]] || die "pods not on the expected nodes"
    [[ -n "$ip_cp" && -n "$ip_worker" ]] || die "pods have no IP"
    ok "bb-cp on $node_of_cp ip $ip_cp; bb-worker on $node_of_worker ip $ip_worker"

    step "verify: the node's Docker sees the pod's containers (RKE-style, what the node agent sees)"
    dk worker ps --filter "label=io.kubernetes.pod.name=bb-worker" --format '{{.ID}} {{.Image}} {{.Names}}' | sed 's/^/        /'
    [[ -n "$(dk worker ps -q --filter "label=io.kubernetes.pod.name=bb-worker")" ]] || die "docker ps on the worker does not list bb-worker"
    ok "docker ps on $worker lists bb-worker (container + pause sandbox)"

    step "verify: kubectl logs bb-worker, kubectl exec bb-cp (apiserver -> kubelet, client cert + webhook authz)"
    local out
    out="$(k -n "$VNS" logs bb-worker 2>&1 | sed -n 1p)"
    info "logs bb-worker: $out"
    [[ "$out" == "bb-worker started on $worker" ]] || die "kubectl logs gave '$out'"
    # shellcheck disable=SC2016  # expanded in the pod
    out="$(k -n "$VNS" exec bb-cp -- sh -c 'echo exec-ok $(hostname) $(cat /etc/hostname)' 2>&1)"
    info "exec bb-cp: $out"
    [[ "$out" == "exec-ok bb-cp bb-cp" ]] || die "kubectl exec gave '$out'"
    out="$(echo piped | k -n "$VNS" exec -i bb-worker -- cat 2>&1)"
    [[ "$out" == piped ]] || die "kubectl exec -i gave '$out'"
    ok "logs, exec and exec -i work with the admin kubeconfig"

    step "verify: pod -> pod across nodes (bb-worker -> $ip_cp:8080 on $cp)"
    out="$(k -n "$VNS" exec bb-worker -- timeout 5 wget -qO- "http://$ip_cp:8080/" 2>&1)"
    info "answer: $out"
    [[ "$out" == "hello from bb-cp on $cp" ]] || die "cross-node pod traffic failed: '$out'"
    out="$(k -n "$VNS" exec bb-cp -- timeout 5 wget -qO- "http://$ip_worker:8080/" 2>&1)"
    info "answer (reverse): $out"
    [[ "$out" == "hello from bb-worker on $worker" ]] || die "cross-node pod traffic (reverse) failed: '$out'"
    # busybox httpd -v logs "[::ffff:PEER]:PORT: response:200": the first request came from bb-worker
    local peer
    peer="$(k -n "$VNS" logs bb-cp 2>&1 | grep -oE '10\.42\.[0-9]+\.[0-9]+' | sed -n 1p || true)"
    info "bb-cp's httpd saw the peer ${peer:-?}"
    [[ "$peer" == "$ip_worker" ]] || die "pod traffic across nodes was NATed (peer ${peer:-?}, expected $ip_worker)"
    ok "pods reach each other across the LAN with their own addresses (no NAT between pods)"

    step "verify: ClusterIP Service bb -> bb-cp:8080 (kube-proxy iptables), from the worker's pod"
    cat <<EOF | k apply -f - | sed 's/^/        /'
apiVersion: v1
kind: Service
metadata: {name: bb, namespace: $VNS}
spec:
  selector: {app: bb, node: cp}
  ports: [{port: 80, targetPort: 8080}]
EOF
    local svc_ip
    svc_ip="$(k -n "$VNS" get svc bb -o jsonpath='{.spec.clusterIP}')"
    info "service bb: $svc_ip:80"
    local deadline=$((SECONDS + 60))
    out=""
    while (( SECONDS < deadline )); do
        out="$(k -n "$VNS" exec bb-worker -- timeout 3 wget -qO- "http://$svc_ip/" 2>&1 || true)"
        [[ "$out" == "hello from bb-cp on $cp" ]] && break
        sleep 1
    done
    info "answer: $out"
    [[ "$out" == "hello from bb-cp on $cp" ]] || die "ClusterIP service did not answer"
    out="$(k -n "$VNS" exec bb-cp -- timeout 3 wget -qO- "http://$svc_ip/" 2>&1 || true)"
    info "from bb-cp itself (hairpin through its own Service): $out"
    [[ "$out" == "hello from bb-cp on $cp" ]] || die "hairpin via ClusterIP failed: '$out'"
    ok "ClusterIP Service answers"

    step "verify: HTTPS from a pod to https://kubernetes.default.svc/version with the pod's SA token"
    # shellcheck disable=SC2016  # expanded in the pod
    out="$(k -n "$VNS" exec bb-worker -- sh -c 'timeout 10 wget -qO- --no-check-certificate --header "Authorization: Bearer $(cat /var/run/secrets/kubernetes.io/serviceaccount/token)" https://kubernetes.default.svc/version' 2>&1 || true)"
    printf '%s\n' "$out" | sed 's/^/        /'
    [[ "$out" == *"\"gitVersion\": \"$K8S_VERSION\""* ]] || die "no version JSON from kubernetes.default.svc"
    # shellcheck disable=SC2016
    out="$(k -n "$VNS" exec bb-worker -- sh -c 'timeout 10 wget -qO- --no-check-certificate --header "Authorization: Bearer $(cat /var/run/secrets/kubernetes.io/serviceaccount/token)" https://kubernetes.default.svc/api/v1/namespaces/default/pods 2>&1; true')"
    info "same token on /api/v1/namespaces/default/pods: $(printf '%s' "$out" | tr '\n' ' ' | cut -c1-120)"
    ok "kubernetes.default.svc ($SERVICE_IP -> $APISERVER_IP:$APISERVER_PORT) answers from a pod"

    step "verify: a pod dials out through the NAT router to the management host ($MGMT_IP)"
    local port lpid got
    port="$(free_port "$MGMT_IP" "$NS_MGMT")"
    # one-shot listener in the management namespace that answers with the peer it saw
    # shellcheck disable=SC2016  # $SOCAT_PEERADDR is socat's
    ip netns exec "$NS_MGMT" timeout 20 socat -T 5 "TCP-LISTEN:$port,bind=$MGMT_IP,reuseaddr" \
        SYSTEM:'echo "peer=$SOCAT_PEERADDR"',nofork >/dev/null 2>&1 &
    lpid=$!
    wait_for 5 "listener $MGMT_IP:$port" bash -c "ip netns exec '$NS_MGMT' ss -Hltn 'sport = :$port' | grep -q ." || true
    got="$(k -n "$VNS" exec bb-worker -- timeout 5 nc "$MGMT_IP" "$port" </dev/null 2>&1 || true)"
    kill "$lpid" 2>/dev/null || true; wait "$lpid" 2>/dev/null || true
    info "bb-worker -> $MGMT_IP:$port: '$got'"
    [[ "$got" == "peer=$NAT_MGMT_IP" ]] || die "pod could not dial out through the NAT (expected peer=$NAT_MGMT_IP)"
    ok "pod egress: pod -> node (MASQUERADE) -> router (MASQUERADE) -> $MGMT_IP, seen as $NAT_MGMT_IP"

    step "verify: a kubernetes.io/service-account-token Secret is filled by the token controller"
    cat <<EOF | k apply -f - | sed 's/^/        /'
apiVersion: v1
kind: Secret
metadata:
  name: default-token
  namespace: $VNS
  annotations: {kubernetes.io/service-account.name: default}
type: kubernetes.io/service-account-token
EOF
    # shellcheck disable=SC2016  # \$( is for the inner bash
    wait_for 30 "token in secret default-token" \
        bash -c "[[ -n \"\$('$K8S/kubectl' -n $VNS get secret default-token -o jsonpath='{.data.token}')\" ]]" ||
        die "token controller did not fill the Secret"
    local tok
    tok="$(k -n "$VNS" get secret default-token -o jsonpath='{.data.token}' | base64 -d)"
    out="$(nsx "$NS_DOWN" "$KUBECTL" --kubeconfig "$K8S/cluster.kubeconfig" --token="$tok" auth whoami -o jsonpath='{.status.userInfo.username}' 2>&1)"
    info "secret token (${#tok} chars) authenticates as: $out"
    [[ "$out" == "system:serviceaccount:$VNS:default" ]] || die "secret token did not authenticate"
    ok "token Secret filled and valid"

    ok "verify passed in $((SECONDS - t0))s"
}

# ---------------------------------------------------------------- down / status / images

node_down() {
    local n="$1" d; d="$(node_dir "$n")"
    [[ -d "$d" ]] || return 0
    step "node $(node_name "$n"): kube-proxy, kubelet, cri-dockerd, pods, dockerd"
    stop_pidfile "$d/kube-proxy.pid" kube-proxy 10
    stop_pidfile "$d/kubelet.pid" kubelet 15
    stop_pidfile "$d/cri-dockerd.pid" cri-dockerd 10
    if "$L/dockerd.sh" status "$d/docker" >/dev/null 2>&1; then
        local ids
        ids="$(dk "$n" ps -aq --filter label=io.kubernetes.pod.name 2>/dev/null || true)"
        if [[ -n "$ids" ]]; then
            info "removing $(wc -w <<<"$ids") pod container(s)"
            # shellcheck disable=SC2086
            dk "$n" rm -f $ids >/dev/null 2>&1 || warn "docker rm -f failed"
        fi
    fi
    "$L/dockerd.sh" stop "$d/docker" | grep -E 'OK|WARN|unmounted' | sed 's/^/    /' || true
    # kubelet volumes (tmpfs) below the node directory, then the shared bind mount itself
    local m
    while read -r m; do umount -l "$m" 2>/dev/null || true; done < <(awk -v p="$d/" 'index($5, p) == 1 { print $5 }' /proc/self/mountinfo | sort -r)
    # pod sandboxes and their addresses are gone with the containers
    rm -rf "$d/cri-dockerd" "$d/cni/ipam" "$d/cni/cache"
    remove_cgroup_root "$n"
    ok "node $(node_name "$n") down"
}

do_down() {
    need_root
    local n
    for n in worker cp; do node_down "$n"; done
    step "kube-scheduler, kube-controller-manager, kube-apiserver, etcd"
    stop_pidfile "$C/kube-scheduler.pid" kube-scheduler 10
    stop_pidfile "$C/kube-controller-manager.pid" kube-controller-manager 10
    if [[ -d "$K8S" ]]; then "$L/kube-apiserver.sh" stop "$K8S" | grep -E 'OK|WARN' | sed 's/^/    /' || true; fi
    step "namespaces $NS_WORKER, $NS_LAN (cluster.sh) and netns.sh's"
    lan_down
    "$L/netns.sh" down | sed 's/^/    /'
    ok "cluster down (state kept in $C)"
}

do_status() {
    local n d
    echo "== processes"
    for f in "$C/kube-controller-manager.pid" "$C/kube-scheduler.pid" "$K8S/kube-apiserver.pid" "$K8S/etcd.pid"; do
        if pid_alive "$f"; then echo "   $(basename "$f" .pid): pid $(cat "$f")"; else echo "   $(basename "$f" .pid): not running"; fi
    done
    for n in "${NODES[@]}"; do
        d="$(node_dir "$n")"
        for f in "$d/docker/dockerd.pid" "$d/cri-dockerd.pid" "$d/kubelet.pid" "$d/kube-proxy.pid"; do
            if pid_alive "$f"; then echo "   $(node_name "$n") $(basename "$f" .pid): pid $(cat "$f")"; else echo "   $(node_name "$n") $(basename "$f" .pid): not running"; fi
        done
    done
    echo "== network"
    if lan_configured; then echo "   LAN configured ($NS_LAN, $NS_WORKER)"; else echo "   LAN not configured"; fi
    if [[ -s "$K8S/env" ]] && "$L/kube-apiserver.sh" status "$K8S" >/dev/null 2>&1; then
        echo "== kubectl get nodes -o wide"
        k get nodes -o wide 2>&1 | sed 's/^/   /'
        echo "== kubectl get pods -A -o wide"
        k get pods -A -o wide 2>&1 | sed 's/^/   /'
    else
        echo "== apiserver not ready"
        return 1
    fi
}

do_load_image() {
    local img="$1" src="${2:-}" n tmp
    tmp="$(mktemp /tmp/tpe2e-image.XXXXXX.tar)"
    trap 'rm -f "$tmp"' RETURN
    step "load image $img into every node"
    if [[ -n "$src" ]]; then
        timeout 300 docker -H "$src" save -o "$tmp" "$img"
    else
        dk cp save -o "$tmp" "$img"
    fi
    for n in "${NODES[@]}"; do
        [[ -z "$src" && "$n" == cp ]] && continue
        dk "$n" load -i "$tmp" | sed "s/^/    $(node_name "$n"): /"
    done
    for n in "${NODES[@]}"; do
        dk "$n" image inspect "$img" >/dev/null || die "$img missing on $(node_name "$n")"
    done
    ok "$img present on ${NODES[*]}"
}

do_load_tar() {
    local f="$1" n
    step "docker load $f into every node"
    for n in "${NODES[@]}"; do dk "$n" load -i "$f" | sed "s/^/    $(node_name "$n"): /"; done
    ok "loaded"
}

case "${1:-}" in
    up) do_up ;;
    lan) need_root; "$L/netns.sh" up | sed 's/^/    /'; lan_up ;;
    down) do_down ;;
    purge) do_down; step "deleting $C"; rm -rf "$C"; ok "purged" ;;
    status) do_status ;;
    verify) do_verify ;;
    env) cat "$C/env" ;;
    load-image) [[ -n "${2:-}" ]] || usage; do_load_image "$2" "${3:-}" ;;
    load-tar) [[ -n "${2:-}" ]] || usage; do_load_tar "$2" ;;
    kubectl) shift; k "$@" ;;
    kubelet-stop) [[ "${2:-}" == cp || "${2:-}" == worker ]] || usage; need_root
        stop_pidfile "$(node_dir "$2")/kubelet.pid" kubelet 15; ok "kubelet of $(node_name "$2") stopped" ;;
    kubelet-start) [[ "${2:-}" == cp || "${2:-}" == worker ]] || usage; need_root
        [[ -s "$K8S/env" ]] || die "cluster not started"
        # shellcheck disable=SC1091
        . "$K8S/env"; start_kubelet "$2" ;;
    -h|--help|help) usage 0 ;;
    *) usage ;;
esac

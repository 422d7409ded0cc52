#!/usr/bin/env bash
# A real etcd + kube-apiserver (built by build-k8s.sh), optionally inside a
# network namespace: the "downstream cluster" the cluster agent talks to.
# No controller-manager, scheduler or kubelet.
#
#   tests/e2e/lib/kube-apiserver.sh start  DIR [NETNS]  start (no-op if healthy)
#   tests/e2e/lib/kube-apiserver.sh stop   DIR          stop apiserver, then etcd (keeps DIR)
#   tests/e2e/lib/kube-apiserver.sh purge  DIR          stop and delete DIR
#   tests/e2e/lib/kube-apiserver.sh status DIR          exit 0 when /readyz answers ok
#   tests/e2e/lib/kube-apiserver.sh verify DIR          kubectl get ns; create namespace, service
#                                                        account, RBAC binding, token; use the token
#
# Files written to DIR:
#   admin.kubeconfig   admin client certificate (CN=tpe2e-admin, O=system:masters)
#   admin.token        static bearer token of the same admin (--token-auth-file)
#   cluster.kubeconfig server + CA only, no credentials (use with --token)
#   pki/ca.crt         CA of the serving and client certificates
#   pki/sa.key|sa.pub  service-account signing key pair
#   env                APISERVER_URL, APISERVER_IP, APISERVER_PORT, ETCD_URL, NETNS, KUBECONFIG
#   kubectl            wrapper: runs /usr/bin/kubectl with admin.kubeconfig (in NETNS if set)
#   etcd.log, kube-apiserver.log, *.pid
#
# Addresses: etcd on 127.0.0.1 (of NETNS), plain HTTP on free ports; kube-apiserver
# on a free port on the namespace's first non-loopback IPv4 address (127.0.0.1
# without NETNS; override with APISERVER_BIND). Inside a namespace the API is
# reachable only from there: use DIR/kubectl or `ip netns exec NETNS kubectl`.
#
# Environment: KUBE_APISERVER, ETCD (binaries; default: the build-k8s.sh cache),
# K8S_VERSION/ETCD_VERSION (to locate them), APISERVER_BIND, APISERVER_PORT,
# SERVICE_CIDR (default 10.43.0.0/16, so the kubernetes service is 10.43.0.1),
# KUBE_APISERVER_START_TIMEOUT (default 180 s), KUBECTL (default kubectl),
# KUBE_APISERVER_EXTRA_ARGS (appended to the command line).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,32p' "$0"; exit "${1:-2}"; }
cmd="${1:-}"; dir="${2:-}"; netns="${3:-}"
[[ -n "$cmd" && -n "$dir" ]] || usage
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"

eval "$("$E2E_LIB_DIR/build-k8s.sh" paths)"
KUBE_APISERVER="${KUBE_APISERVER_BIN:-$KUBE_APISERVER}"
ETCD="${ETCD_BIN:-$ETCD}"
KUBECTL="${KUBECTL:-kubectl}"
SERVICE_CIDR="${SERVICE_CIDR:-10.43.0.0/16}"
START_TIMEOUT="${KUBE_APISERVER_START_TIMEOUT:-180}"
PKI="$dir/pki"
USER_BIND="${APISERVER_BIND:-}"
USER_PORT="${APISERVER_PORT:-}"

# netns of a running instance is remembered in DIR/env
if [[ -z "$netns" && -s "$dir/env" ]]; then
    netns="$(sed -n 's/^NETNS=//p' "$dir/env")"
fi

nsrun() { in_netns "$netns" "$@"; }
# bg_start PIDFILE LOG CMD...: start CMD detached (in NETNS), record its pid.
bg_start() {
    local pidfile="$1" log="$2"; shift 2
    if [[ -n "$netns" ]]; then
        setsid nsenter --net="/run/netns/$netns" "$@" >>"$log" 2>&1 </dev/null &
    else
        setsid "$@" >>"$log" 2>&1 </dev/null &
    fi
    echo $! >"$pidfile"
}

port_is_free() {
    nsrun python3 -c 'import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((sys.argv[1], int(sys.argv[2])))' "$1" "$2" 2>/dev/null
}

readyz() {
    nsrun curl -sf --max-time 5 --cacert "$PKI/ca.crt" \
        --cert "$PKI/admin.crt" --key "$PKI/admin.key" "$APISERVER_URL/readyz" 2>/dev/null
}

load_env() {
    [[ -s "$dir/env" ]] || return 1
    # shellcheck disable=SC1091
    . "$dir/env"
}

gen_pki() {
    local ip="$1"
    mkdir -p "$PKI"
    if [[ -s "$PKI/ca.crt" && -s "$PKI/apiserver.crt" ]] &&
        [[ "$(openssl x509 -in "$PKI/apiserver.crt" -noout -ext subjectAltName 2>/dev/null || true)" =~ IP\ Address:${ip//./\\.}(,|$) ]]; then
        info "PKI exists in $PKI (serving cert covers $ip)"
        return 0
    fi
    info "generating CA, serving cert, admin client cert, service-account keys (openssl)"
    local days=3650
    openssl req -x509 -newkey rsa:2048 -nodes -days "$days" -sha256 \
        -keyout "$PKI/ca.key" -out "$PKI/ca.crt" -subj "/CN=tpe2e-kubernetes-ca" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    local svc_ip
    svc_ip="$(python3 -c "import ipaddress,sys; print(ipaddress.ip_network(sys.argv[1])[1])" "$SERVICE_CIDR")"
    cat >"$PKI/apiserver.ext" <<EOF
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,IP:127.0.0.1,$([[ $ip == 127.0.0.1 ]] || echo "IP:$ip,")IP:$svc_ip
EOF
    openssl req -newkey rsa:2048 -nodes -keyout "$PKI/apiserver.key" -out "$PKI/apiserver.csr" \
        -subj "/CN=kube-apiserver" 2>/dev/null
    openssl x509 -req -in "$PKI/apiserver.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
        -days "$days" -sha256 -extfile "$PKI/apiserver.ext" -out "$PKI/apiserver.crt" 2>/dev/null
    cat >"$PKI/client.ext" <<EOF
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth
EOF
    openssl req -newkey rsa:2048 -nodes -keyout "$PKI/admin.key" -out "$PKI/admin.csr" \
        -subj "/O=system:masters/CN=tpe2e-admin" 2>/dev/null
    openssl x509 -req -in "$PKI/admin.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
        -days "$days" -sha256 -extfile "$PKI/client.ext" -out "$PKI/admin.crt" 2>/dev/null
    openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
    openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
    chmod 600 "$PKI"/*.key
    info "serving cert SANs: $(openssl x509 -in "$PKI/apiserver.crt" -noout -ext subjectAltName | tail -1 | sed 's/^ *//')"
}

# The client certificate the apiserver presents to kubelets (logs, exec, port-forward);
# separate from gen_pki so that an existing PKI gains it too. system:masters, so the
# kubelets' webhook authorization (SubjectAccessReview) allows it.
gen_kubelet_client_cert() {
    [[ -s "$PKI/apiserver-kubelet-client.crt" ]] && return 0
    info "generating the apiserver's kubelet client certificate"
    [[ -s "$PKI/client.ext" ]] || printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' >"$PKI/client.ext"
    openssl req -newkey rsa:2048 -nodes -keyout "$PKI/apiserver-kubelet-client.key" \
        -out "$PKI/apiserver-kubelet-client.csr" -subj "/O=system:masters/CN=kube-apiserver-kubelet-client" 2>/dev/null
    openssl x509 -req -in "$PKI/apiserver-kubelet-client.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" \
        -CAcreateserial -days 3650 -sha256 -extfile "$PKI/client.ext" -out "$PKI/apiserver-kubelet-client.crt" 2>/dev/null
    chmod 600 "$PKI/apiserver-kubelet-client.key"
}

write_kubeconfig() {
    local b64="base64 -w0"
    cat >"$dir/admin.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: tpe2e
  cluster:
    server: $APISERVER_URL
    certificate-authority-data: $($b64 <"$PKI/ca.crt")
users:
- name: tpe2e-admin
  user:
    client-certificate-data: $($b64 <"$PKI/admin.crt")
    client-key-data: $($b64 <"$PKI/admin.key")
contexts:
- name: tpe2e
  context:
    cluster: tpe2e
    user: tpe2e-admin
current-context: tpe2e
EOF
    chmod 600 "$dir/admin.kubeconfig"
    # The same cluster without credentials: for --token tests.
    cat >"$dir/cluster.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: tpe2e
  cluster:
    server: $APISERVER_URL
    certificate-authority-data: $($b64 <"$PKI/ca.crt")
users:
- name: none
  user: {}
contexts:
- name: tpe2e
  context:
    cluster: tpe2e
    user: none
current-context: tpe2e
EOF
    cat >"$dir/kubectl" <<EOF
#!/usr/bin/env bash
# generated by tests/e2e/lib/kube-apiserver.sh: kubectl as the admin of $APISERVER_URL
exec ${netns:+ip netns exec $netns }$KUBECTL --kubeconfig "$dir/admin.kubeconfig" "\$@"
EOF
    chmod +x "$dir/kubectl"
}

do_start() {
    need_root
    need_cmd openssl curl python3 setsid nsenter
    [[ -x "$KUBE_APISERVER" ]] || die "no kube-apiserver at $KUBE_APISERVER (run build-k8s.sh)"
    [[ -x "$ETCD" ]] || die "no etcd at $ETCD (run build-k8s.sh)"
    if [[ -n "$netns" && ! -e "/run/netns/$netns" ]]; then
        die "network namespace $netns does not exist (run netns.sh up)"
    fi
    step "kube-apiserver in $dir${netns:+ (netns $netns)}"
    info "$("$KUBE_APISERVER" --version), $("$ETCD" --version | sed -n 1p)"
    if load_env && pid_alive "$dir/kube-apiserver.pid" && pid_alive "$dir/etcd.pid" &&
        [[ "$(readyz)" == ok ]]; then
        ok "already running and ready at $APISERVER_URL"
        return 0
    fi
    if pid_alive "$dir/kube-apiserver.pid" || pid_alive "$dir/etcd.pid"; then
        info "a previous instance is not healthy: stopping it"
        do_stop
    fi

    # --- addresses
    local ip
    local prev_ip="${APISERVER_IP:-}" prev_port="${APISERVER_PORT:-}"
    if [[ -n "$USER_BIND" ]]; then
        ip="$USER_BIND"
    elif [[ -n "$netns" ]]; then
        ip="$(ip -n "$netns" -4 -o addr show scope global | awk '{print $4}' | cut -d/ -f1 | sed -n 1p)"
        [[ -n "$ip" ]] || die "namespace $netns has no global IPv4 address"
    else
        ip=127.0.0.1
    fi
    # keep the previous port (stable kubeconfigs across restarts) while it is free
    local port
    if [[ -n "$USER_PORT" ]]; then
        port="$USER_PORT"
    elif [[ "$prev_ip" == "$ip" && -n "$prev_port" ]] && port_is_free "$ip" "$prev_port"; then
        port="$prev_port"
    else
        port="$(free_port "$ip" "$netns")"
    fi
    local etcd_port etcd_peer
    etcd_port="$(free_port 127.0.0.1 "$netns")"
    etcd_peer="$(free_port 127.0.0.1 "$netns")"
    while [[ "$etcd_peer" == "$etcd_port" || "$etcd_peer" == "$port" ]]; do etcd_peer="$(free_port 127.0.0.1 "$netns")"; done
    APISERVER_URL="https://$ip:$port"
    ETCD_URL="http://127.0.0.1:$etcd_port"
    info "apiserver $APISERVER_URL, etcd $ETCD_URL (peer :$etcd_peer)"

    step "certificates and keys"
    gen_pki "$ip"
    gen_kubelet_client_cert
    if [[ ! -s "$dir/admin.token" ]]; then
        python3 -c 'import secrets; print(secrets.token_hex(24))' >"$dir/admin.token"
        chmod 600 "$dir/admin.token"
    fi
    printf '%s,tpe2e-admin-token,tpe2e-admin-token-uid,"system:masters"\n' "$(cat "$dir/admin.token")" >"$dir/tokens.csv"
    chmod 600 "$dir/tokens.csv"
    write_kubeconfig
    cat >"$dir/env" <<EOF
APISERVER_URL=$APISERVER_URL
APISERVER_IP=$ip
APISERVER_PORT=$port
ETCD_URL=$ETCD_URL
NETNS=$netns
KUBECONFIG=$dir/admin.kubeconfig
CA_CERT=$PKI/ca.crt
ADMIN_TOKEN_FILE=$dir/admin.token
EOF
    info "wrote $dir/admin.kubeconfig, $dir/admin.token, $dir/env, $dir/kubectl"

    step "etcd ($ETCD_URL, data $dir/etcd-data)"
    mkdir -p "$dir/etcd-data"
    chmod 700 "$dir/etcd-data"
    echo "=== $(date -u +%FT%TZ) start" >>"$dir/etcd.log"
    bg_start "$dir/etcd.pid" "$dir/etcd.log" "$ETCD" \
        --name tpe2e --data-dir "$dir/etcd-data" \
        --listen-client-urls "$ETCD_URL" --advertise-client-urls "$ETCD_URL" \
        --listen-peer-urls "http://127.0.0.1:$etcd_peer" \
        --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
        --initial-cluster "tpe2e=http://127.0.0.1:$etcd_peer" \
        --initial-cluster-state new --unsafe-no-fsync --log-level warn \
        --quota-backend-bytes 2147483648
    wait_for 30 "etcd /health" bash -c "${netns:+ip netns exec $netns }curl -sf --max-time 2 $ETCD_URL/health | grep -q '\"health\":\"true\"'" ||
        { tail -n 20 "$dir/etcd.log" >&2; die "etcd did not become healthy"; }
    ok "etcd pid $(cat "$dir/etcd.pid") healthy"

    step "kube-apiserver ($APISERVER_URL; wait <= ${START_TIMEOUT}s for /readyz)"
    # shellcheck disable=SC2054  # commas inside flag values
    local args=(
        --etcd-servers="$ETCD_URL"
        --bind-address="$ip" --advertise-address="$ip" --secure-port="$port"
        --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key"
        --client-ca-file="$PKI/ca.crt"
        --token-auth-file="$dir/tokens.csv"
        --service-account-key-file="$PKI/sa.pub"
        --service-account-signing-key-file="$PKI/sa.key"
        --service-account-issuer=https://kubernetes.default.svc.cluster.local
        --api-audiences=https://kubernetes.default.svc.cluster.local
        --authorization-mode=Node,RBAC
        --service-cluster-ip-range="$SERVICE_CIDR"
        --allow-privileged=true
        --cert-dir="$PKI/generated"
        --profiling=false
        # Kubelets (tests/e2e/lib/cluster.sh): the apiserver dials them by InternalIP (every
        # node has the same hostname here), verifies their serving certificates with our CA
        # and authenticates with its own client certificate. Unused without kubelets.
        --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt"
        --kubelet-client-key="$PKI/apiserver-kubelet-client.key"
        --kubelet-certificate-authority="$PKI/ca.crt"
        --kubelet-preferred-address-types=InternalIP
        --v=1
    )
    # shellcheck disable=SC2206  # word splitting intended: extra flags
    [[ -z "${KUBE_APISERVER_EXTRA_ARGS:-}" ]] || args+=(${KUBE_APISERVER_EXTRA_ARGS})
    # A loopback advertise address is rejected by the endpoint reconciler
    # ("may not be in the loopback range"): no kubernetes Endpoints then.
    if [[ "$ip" == 127.* ]]; then args+=(--endpoint-reconciler-type=none); fi
    echo "=== $(date -u +%FT%TZ) start: ${args[*]}" >>"$dir/kube-apiserver.log"
    local t0=$SECONDS
    bg_start "$dir/kube-apiserver.pid" "$dir/kube-apiserver.log" "$KUBE_APISERVER" "${args[@]}"
    local deadline=$((SECONDS + START_TIMEOUT)) r=""
    while (( SECONDS < deadline )); do
        r="$(readyz || true)"
        [[ "$r" == ok ]] && break
        pid_alive "$dir/kube-apiserver.pid" || { tail -n 30 "$dir/kube-apiserver.log" >&2; die "kube-apiserver exited"; }
        sleep 1
    done
    if [[ "$r" != ok ]]; then
        tail -n 30 "$dir/kube-apiserver.log" >&2
        nsrun curl -s --max-time 5 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
            "$APISERVER_URL/readyz?verbose" 2>&1 | grep -v '\[+\]' >&2 || true
        die "kube-apiserver not ready after ${START_TIMEOUT}s"
    fi
    ok "kube-apiserver pid $(cat "$dir/kube-apiserver.pid") ready in $((SECONDS - t0))s at $APISERVER_URL"
    info "kubectl: $dir/kubectl get ns   (or ${netns:+ip netns exec $netns }kubectl --kubeconfig $dir/admin.kubeconfig ...)"
}

do_stop() {
    step "stopping kube-apiserver and etcd in $dir"
    stop_pidfile "$dir/kube-apiserver.pid" kube-apiserver 20
    stop_pidfile "$dir/etcd.pid" etcd 15
}

do_verify() {
    load_env || die "not started ($dir/env missing)"
    [[ "$(readyz)" == ok ]] || die "kube-apiserver at $APISERVER_URL is not ready"
    local k="$dir/kubectl" ns=tpe2e-verify sa=tpe2e-verify

    step "kubectl version"
    "$k" version 2>&1 | sed 's/^/        /'

    step "kubectl get ns"
    "$k" get ns | sed 's/^/        /'

    step "kubectl (static admin token) auth whoami"
    nsrun "$KUBECTL" --kubeconfig "$dir/cluster.kubeconfig" --token="$(cat "$dir/admin.token")" \
        auth whoami 2>&1 | sed 's/^/        /'

    step "create namespace $ns, service account $sa, ClusterRole $sa-read (get/list/watch namespaces) + binding (idempotent)"
    "$k" create namespace "$ns" --dry-run=client -o yaml | "$k" apply -f - | sed 's/^/        /'
    "$k" -n "$ns" create serviceaccount "$sa" --dry-run=client -o yaml | "$k" apply -f - | sed 's/^/        /'
    "$k" create clusterrole "$sa-read" --verb=get,list,watch --resource=namespaces \
        --dry-run=client -o yaml | "$k" apply -f - | sed 's/^/        /'
    "$k" create clusterrolebinding "$sa-read" --clusterrole="$sa-read" --serviceaccount="$ns:$sa" \
        --dry-run=client -o yaml | "$k" apply -f - | sed 's/^/        /'

    step "kubectl create token $sa (TokenRequest API)"
    local tok
    tok="$("$k" -n "$ns" create token "$sa" --duration=1h)"
    [[ "$tok" == *.*.* ]] || die "not a JWT: $tok"
    info "token: ${tok:0:24}... ($(printf '%s' "$tok" | wc -c) chars)"
    ok "token issued"

    step "use the token: auth whoami, get ns (allowed by $sa-read), create ns (forbidden)"
    local tk=(nsrun "$KUBECTL" --kubeconfig "$dir/cluster.kubeconfig" --token="$tok")
    "${tk[@]}" auth whoami 2>&1 | sed 's/^/        /'
    "${tk[@]}" get ns -o name | sed 's/^/        /'
    if "${tk[@]}" create namespace tpe2e-should-fail 2>"$dir/verify.err"; then
        die "service account could create a namespace"
    fi
    info "$(head -1 "$dir/verify.err")"
    ok "service-account token authenticates; RBAC applies"

    step "legacy token Secret stays empty without kube-controller-manager (expected)"
    cat <<EOF | "$k" apply -f - | sed 's/^/        /'
apiVersion: v1
kind: Secret
metadata:
  name: $sa-token
  namespace: $ns
  annotations:
    kubernetes.io/service-account.name: $sa
type: kubernetes.io/service-account-token
EOF
    sleep 2
    local keys
    keys="$("$k" -n "$ns" get secret "$sa-token" -o jsonpath='{.data}' 2>/dev/null || true)"
    info "secret .data = '${keys}' (the token controller runs in kube-controller-manager, which is absent; use 'kubectl create token')"
    ok "verify done"
}

case "$cmd" in
    start) do_start ;;
    stop) do_stop ;;
    purge) do_stop; step "deleting $dir"; rm -rf "$dir"; ok "purged" ;;
    status)
        if load_env && [[ "$(readyz)" == ok ]]; then ok "ready at $APISERVER_URL"; else info "not ready"; exit 1; fi ;;
    verify) do_verify ;;
    -h|--help|help) usage 0 ;;
    *) usage ;;
esac

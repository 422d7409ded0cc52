#!/usr/bin/env bash
# NAT topology in network namespaces (names prefixed tpe2e-). Only addresses
# inside these namespaces are ever used; the root namespace gets no address,
# route or rule.
#
#     tpe2e-mgmt                 tpe2e-nat (router)                tpe2e-down
#   10.213.0.1/24 ---veth--- 10.213.0.254/24 | 10.213.1.1/24 ---veth--- 10.213.1.2/24
#   [tpe2e-m0]               [tpe2e-m1]        [tpe2e-d1]              [tpe2e-d0]
#   route 10.213.1.0/24      ip_forward=1, MASQUERADE out of tpe2e-m1,  default via
#     via 10.213.0.254       FORWARD: drop NEW from tpe2e-m1 to tpe2e-d1  10.213.1.1
#
# The downstream host dials out to the management host through NAT (the
# management side sees 10.213.0.254); the management host cannot open a
# connection to the downstream host (it has a route, the router drops it).
#
#   tests/e2e/lib/netns.sh up                  create (no-op when complete; rebuilds a partial one)
#   tests/e2e/lib/netns.sh down                stop processes left in the namespaces, delete them
#   tests/e2e/lib/netns.sh check               prove NAT out works and inbound is blocked
#   tests/e2e/lib/netns.sh cut [link|drop]     fault: take the router's mgmt leg down (link, default)
#                                              or silently drop everything it forwards (drop)
#   tests/e2e/lib/netns.sh restore             undo cut
#   tests/e2e/lib/netns.sh status              show namespaces, addresses, rules, cut state
#   tests/e2e/lib/netns.sh exec mgmt|nat|down CMD...   run CMD in a namespace
#   tests/e2e/lib/netns.sh env                 print the names and addresses as shell variables
#
# Notes: `cut link` sets the router's mgmt-side veth down (its peer in tpe2e-mgmt
# loses carrier; new connects from tpe2e-down fail fast with "Network is
# unreachable"); `cut drop` keeps links up and silently drops all forwarded
# packets (connects time out). Measured on kernel 6.18: an established TCP
# connection through the NAT survives a 5 s cut of either kind and carries data
# again after `restore` (TCP retransmits); the application sees only a stall.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

P="${TPE2E_PREFIX:-tpe2e}"
NS_MGMT="$P-mgmt"; NS_NAT="$P-nat"; NS_DOWN="$P-down"
IF_MGMT="$P-m0"; IF_NAT_MGMT="$P-m1"; IF_NAT_DOWN="$P-d1"; IF_DOWN="$P-d0"
MGMT_NET=10.213.0.0/24; DOWN_NET=10.213.1.0/24
MGMT_IP=10.213.0.1; NAT_MGMT_IP=10.213.0.254; NAT_DOWN_IP=10.213.1.1; DOWN_IP=10.213.1.2
CUT_STATE="/run/$P-netns.cut"

nsx() { local ns="$1"; shift; ip netns exec "$ns" "$@"; }

# iptables in the router namespace: iptables (nft backend on Debian 12), else legacy.
IPT=""
pick_iptables() {
    local c
    for c in iptables iptables-legacy; do
        command -v "$c" >/dev/null 2>&1 || continue
        if nsx "$NS_NAT" "$c" -w 5 -t nat -S >/dev/null 2>&1; then IPT="$c"; return 0; fi
    done
    die "neither iptables nor iptables-legacy works in $NS_NAT"
}
ipt() { nsx "$NS_NAT" "$IPT" -w 5 "$@"; }

ns_exists() { [[ -e "/run/netns/$1" ]]; }

configured() {   # complete and correct?
    ns_exists "$NS_MGMT" && ns_exists "$NS_NAT" && ns_exists "$NS_DOWN" || return 1
    nsx "$NS_MGMT" ip -4 -o addr show dev "$IF_MGMT" 2>/dev/null | grep " $MGMT_IP/24" >/dev/null || return 1
    nsx "$NS_DOWN" ip -4 -o addr show dev "$IF_DOWN" 2>/dev/null | grep " $DOWN_IP/24" >/dev/null || return 1
    nsx "$NS_NAT" ip -4 -o addr show dev "$IF_NAT_MGMT" 2>/dev/null | grep " $NAT_MGMT_IP/24" >/dev/null || return 1
    nsx "$NS_NAT" ip -4 -o addr show dev "$IF_NAT_DOWN" 2>/dev/null | grep " $NAT_DOWN_IP/24" >/dev/null || return 1
    nsx "$NS_DOWN" ip route show default | grep "via $NAT_DOWN_IP" >/dev/null || return 1
    nsx "$NS_MGMT" ip route show "$DOWN_NET" | grep "via $NAT_MGMT_IP" >/dev/null || return 1
    [[ "$(nsx "$NS_NAT" sysctl -n net.ipv4.ip_forward)" == 1 ]] || return 1
    pick_iptables
    ipt -t nat -C POSTROUTING -s "$DOWN_NET" -o "$IF_NAT_MGMT" -j MASQUERADE 2>/dev/null || return 1
    ipt -C FORWARD -i "$IF_NAT_MGMT" -o "$IF_NAT_DOWN" -m conntrack --ctstate NEW -j DROP 2>/dev/null || return 1
}

do_down() {
    step "deleting namespaces $NS_MGMT $NS_NAT $NS_DOWN"
    local ns pids pid
    for ns in "$NS_DOWN" "$NS_NAT" "$NS_MGMT"; do
        ns_exists "$ns" || { info "$ns: absent"; continue; }
        pids="$(ip netns pids "$ns" 2>/dev/null || true)"
        if [[ -n "$pids" ]]; then
            for pid in $pids; do
                info "$ns: TERM pid $pid ($(tr '\0' ' ' </proc/"$pid"/cmdline 2>/dev/null | cut -c1-80))"
                kill -TERM "$pid" 2>/dev/null || true
            done
            local deadline=$((SECONDS + 10))
            while (( SECONDS < deadline )) && [[ -n "$(ip netns pids "$ns" 2>/dev/null)" ]]; do sleep 0.2; done
            for pid in $(ip netns pids "$ns" 2>/dev/null); do
                warn "$ns: KILL pid $pid"
                kill -KILL "$pid" 2>/dev/null || true
            done
        fi
        ip netns del "$ns"
        ok "$ns deleted"
    done
    rm -f "$CUT_STATE"
}

do_up() {
    need_root
    need_cmd ip sysctl
    step "network namespaces $NS_MGMT / $NS_NAT / $NS_DOWN"
    if configured; then
        ok "already up and configured (use 'down' to rebuild)"
        return 0
    fi
    if ns_exists "$NS_MGMT" || ns_exists "$NS_NAT" || ns_exists "$NS_DOWN"; then
        info "partial topology found: rebuilding"
        do_down
    fi
    local ns
    for ns in "$NS_MGMT" "$NS_NAT" "$NS_DOWN"; do
        ip netns add "$ns"
        nsx "$ns" ip link set lo up
        info "created $ns (lo up)"
    done

    step "veth $IF_MGMT ($NS_MGMT) <-> $IF_NAT_MGMT ($NS_NAT): management network $MGMT_NET"
    ip link add "$IF_MGMT" netns "$NS_MGMT" type veth peer name "$IF_NAT_MGMT" netns "$NS_NAT"
    nsx "$NS_MGMT" ip addr add "$MGMT_IP/24" dev "$IF_MGMT"
    nsx "$NS_NAT" ip addr add "$NAT_MGMT_IP/24" dev "$IF_NAT_MGMT"
    nsx "$NS_MGMT" ip link set "$IF_MGMT" up
    nsx "$NS_NAT" ip link set "$IF_NAT_MGMT" up
    info "$NS_MGMT $IF_MGMT=$MGMT_IP, $NS_NAT $IF_NAT_MGMT=$NAT_MGMT_IP"

    step "veth $IF_NAT_DOWN ($NS_NAT) <-> $IF_DOWN ($NS_DOWN): downstream network $DOWN_NET"
    ip link add "$IF_NAT_DOWN" netns "$NS_NAT" type veth peer name "$IF_DOWN" netns "$NS_DOWN"
    nsx "$NS_NAT" ip addr add "$NAT_DOWN_IP/24" dev "$IF_NAT_DOWN"
    nsx "$NS_DOWN" ip addr add "$DOWN_IP/24" dev "$IF_DOWN"
    nsx "$NS_NAT" ip link set "$IF_NAT_DOWN" up
    nsx "$NS_DOWN" ip link set "$IF_DOWN" up
    info "$NS_NAT $IF_NAT_DOWN=$NAT_DOWN_IP, $NS_DOWN $IF_DOWN=$DOWN_IP"

    step "routes"
    nsx "$NS_DOWN" ip route add default via "$NAT_DOWN_IP"
    info "$NS_DOWN: default via $NAT_DOWN_IP"
    # A route exists so that inbound attempts reach the router and are dropped
    # by its firewall (rather than failing for lack of a route).
    nsx "$NS_MGMT" ip route add "$DOWN_NET" via "$NAT_MGMT_IP"
    info "$NS_MGMT: $DOWN_NET via $NAT_MGMT_IP"

    step "router $NS_NAT: forwarding, MASQUERADE, inbound drop"
    nsx "$NS_NAT" sysctl -qw net.ipv4.ip_forward=1
    info "net.ipv4.ip_forward=$(nsx "$NS_NAT" sysctl -n net.ipv4.ip_forward)"
    pick_iptables
    info "using $IPT ($("$IPT" --version))"
    ipt -t nat -A POSTROUTING -s "$DOWN_NET" -o "$IF_NAT_MGMT" -j MASQUERADE
    ipt -A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
    ipt -A FORWARD -i "$IF_NAT_MGMT" -o "$IF_NAT_DOWN" -m conntrack --ctstate NEW -j DROP
    ipt -A FORWARD -i "$IF_NAT_DOWN" -o "$IF_NAT_MGMT" -j ACCEPT
    ipt -S FORWARD | sed 's/^/        /'
    ipt -t nat -S POSTROUTING | sed 's/^/        /'
    configured || die "topology incomplete after setup"
    ok "topology up"
}

# listen NS IP PORT OUTFILE: one-shot TCP listener that answers with the
# peer's address and records it; ends after one connection or 15 s.
listen() {
    local ns="$1" ip="$2" port="$3" out="$4"
    : >"$out"
    # `ip netns exec` execs timeout, so $! is timeout's pid (kill forwards to socat)
    ip netns exec "$ns" timeout 15 socat -T 5 "TCP-LISTEN:$port,bind=$ip,reuseaddr" \
        SYSTEM:'echo "peer=$SOCAT_PEERADDR"; echo "$SOCAT_PEERADDR" >&2',nofork 2>"$out" >/dev/null &
    LISTENER_PID=$!
    # wait (bounded) until it listens
    wait_for 5 "listener $ip:$port in $ns" \
        bash -c "ip netns exec '$ns' ss -Hltn 'sport = :$port' | grep -q ."
}

do_check() {
    need_root
    need_cmd socat ss timeout
    configured || die "topology is not up (run: $0 up)"
    local tmp port got rc
    tmp="$(mktemp -d /tmp/tpe2e-netcheck.XXXXXX)"
    trap 'rm -rf "$tmp"; [[ -n "${LISTENER_PID:-}" ]] && kill "$LISTENER_PID" 2>/dev/null; true' RETURN
    local fails=0

    step "check: $NS_DOWN -> $NS_MGMT $MGMT_IP (outbound through NAT) must succeed"
    port="$(free_port "$MGMT_IP" "$NS_MGMT")"
    listen "$NS_MGMT" "$MGMT_IP" "$port" "$tmp/peer1" || die "listener did not start"
    info "listener $MGMT_IP:$port in $NS_MGMT"
    got="$(nsx "$NS_DOWN" timeout 3 socat -T 2 - "TCP:$MGMT_IP:$port" </dev/null 2>&1)" && rc=0 || rc=$?
    wait "$LISTENER_PID" 2>/dev/null || true; LISTENER_PID=""
    info "client in $NS_DOWN: exit $rc, server answered '$got'"
    if [[ $rc == 0 && "$got" == "peer=$NAT_MGMT_IP" ]]; then
        ok "connected; $NS_MGMT saw source $NAT_MGMT_IP (the router), not $DOWN_IP"
    else
        warn "outbound connection failed or was not NATed (expected peer=$NAT_MGMT_IP)"
        fails=$((fails + 1))
    fi

    step "check: $NS_NAT -> $NS_DOWN $DOWN_IP (control: the listener is reachable from its own LAN)"
    port="$(free_port "$DOWN_IP" "$NS_DOWN")"
    listen "$NS_DOWN" "$DOWN_IP" "$port" "$tmp/peer2" || die "listener did not start"
    info "listener $DOWN_IP:$port in $NS_DOWN"
    got="$(nsx "$NS_NAT" timeout 3 socat -T 2 - "TCP:$DOWN_IP:$port" </dev/null 2>&1)" && rc=0 || rc=$?
    wait "$LISTENER_PID" 2>/dev/null || true; LISTENER_PID=""
    if [[ $rc == 0 && "$got" == "peer=$NAT_DOWN_IP" ]]; then
        ok "router reaches $DOWN_IP:$port ('$got')"
    else
        warn "control connection failed: exit $rc '$got'"
        fails=$((fails + 1))
    fi

    step "check: $NS_MGMT -> $NS_DOWN $DOWN_IP (inbound through NAT) must FAIL"
    port="$(free_port "$DOWN_IP" "$NS_DOWN")"
    listen "$NS_DOWN" "$DOWN_IP" "$port" "$tmp/peer3" || die "listener did not start"
    info "listener $DOWN_IP:$port in $NS_DOWN; $NS_MGMT has route $(nsx "$NS_MGMT" ip route show "$DOWN_NET")"
    rc=0
    nsx "$NS_MGMT" timeout 3 bash -c "exec 3<>/dev/tcp/$DOWN_IP/$port" 2>/dev/null || rc=$?
    local drops
    drops="$(ipt -L FORWARD -v -n -x | awk '/DROP/ && /ctstate NEW/ && !n++ {print $1}')"
    kill "$LISTENER_PID" 2>/dev/null || true; wait "$LISTENER_PID" 2>/dev/null || true; LISTENER_PID=""
    if [[ $rc == 0 ]]; then
        warn "inbound connection SUCCEEDED: the NAT does not block inbound"
        fails=$((fails + 1))
    elif [[ -s "$tmp/peer3" ]]; then
        warn "listener saw a peer: $(cat "$tmp/peer3")"
        fails=$((fails + 1))
    else
        ok "blocked (bash /dev/tcp exit $rc$([[ $rc == 124 ]] && echo ': timed out after 3 s'); router FORWARD drop counter: ${drops:-?} packets)"
    fi

    step "check: the root namespace has no address in 10.213.0.0/16"
    if ip -4 -o addr | grep ' 10\.213\.' >/dev/null; then
        warn "root namespace carries a 10.213.x address"; fails=$((fails + 1))
    else
        ok "none"
    fi

    if ((fails)); then die "$fails check(s) failed"; fi
    ok "all network checks passed"
}

do_cut() {
    local mode="${1:-link}"
    configured || die "topology is not up"
    if [[ -s "$CUT_STATE" ]]; then ok "already cut ($(cat "$CUT_STATE"))"; return 0; fi
    case "$mode" in
        link)
            step "cut: $NS_NAT $IF_NAT_MGMT down (router loses its management-side link)"
            nsx "$NS_NAT" ip link set "$IF_NAT_MGMT" down ;;
        drop)
            step "cut: $NS_NAT drops every forwarded packet (links stay up, conntrack kept)"
            ipt -I FORWARD 1 -j DROP -m comment --comment "$P-cut" ;;
        *) die "cut mode must be link or drop" ;;
    esac
    echo "$mode $(date -u +%FT%TZ)" >"$CUT_STATE"
    ok "cut ($mode) at $(date -u +%T)"
}

do_restore() {
    configured >/dev/null 2>&1 || true
    step "restore"
    ns_exists "$NS_NAT" || die "topology is not up"
    pick_iptables
    nsx "$NS_NAT" ip link set "$IF_NAT_MGMT" up
    while ipt -D FORWARD -j DROP -m comment --comment "$P-cut" 2>/dev/null; do :; done
    if [[ -s "$CUT_STATE" ]]; then info "was cut: $(cat "$CUT_STATE")"; fi
    rm -f "$CUT_STATE"
    # wait (bounded) for the veth to be operational again
    wait_for 10 "$IF_NAT_MGMT up" bash -c "ip -n '$NS_NAT' -o link show '$IF_NAT_MGMT' | grep -q 'LOWER_UP'" || true
    ok "restored at $(date -u +%T)"
}

do_status() {
    local ns
    for ns in "$NS_MGMT" "$NS_NAT" "$NS_DOWN"; do
        if ! ns_exists "$ns"; then echo "$ns: absent"; continue; fi
        echo "== $ns"
        nsx "$ns" ip -br addr | sed 's/^/   /'
        nsx "$ns" ip route | sed 's/^/   route /'
        local pids; pids="$(ip netns pids "$ns" | tr '\n' ' ')"
        [[ -z "$pids" ]] || echo "   pids: $pids"
    done
    if ns_exists "$NS_NAT"; then
        pick_iptables
        ipt -S FORWARD | sed 's/^/   /'
        ipt -t nat -S POSTROUTING | sed 's/^/   /'
    fi
    if [[ -s "$CUT_STATE" ]]; then echo "CUT: $(cat "$CUT_STATE")"; else echo "not cut"; fi
    configured && echo "configured: yes" || echo "configured: NO"
}

do_env() {
    cat <<EOF
NS_MGMT=$NS_MGMT
NS_NAT=$NS_NAT
NS_DOWN=$NS_DOWN
MGMT_IP=$MGMT_IP
NAT_MGMT_IP=$NAT_MGMT_IP
NAT_DOWN_IP=$NAT_DOWN_IP
DOWN_IP=$DOWN_IP
EOF
}

case "${1:-}" in
    up) do_up ;;
    down) need_root; do_down; ok "topology down" ;;
    check) do_check ;;
    cut) need_root; do_cut "${2:-link}" ;;
    restore) need_root; do_restore ;;
    status) do_status ;;
    env) do_env ;;
    exec)
        shift
        case "${1:-}" in
            mgmt) ns="$NS_MGMT" ;; nat) ns="$NS_NAT" ;; down) ns="$NS_DOWN" ;;
            *) die "exec needs mgmt|nat|down" ;;
        esac
        shift
        exec ip netns exec "$ns" "$@" ;;
    -h|--help|help) sed -n '2,30p' "$0" ;;
    *) sed -n '2,30p' "$0"; exit 2 ;;
esac

# shellcheck shell=bash
# Helpers for tests/e2e/run.sh: step bookkeeping with timings, processes started in
# the test namespaces (recorded by pid, stopped by pid/process group, never by name),
# and thin wrappers for the tools a user runs against the management server:
#
#   ts ARGS...            tunnel-server admin CLI (in the management namespace)
#   kc USER ARGS...       the real kubectl ($KUBECTL: the apiserver's own release, built by
#                         lib/build-k8s.sh) with USER's kubeconfig from `tunnel-server kubeconfig`
#   kd ARGS...            kubectl as the downstream cluster's own admin (in the downstream namespace)
#   dk ARGS...            the real docker CLI through the server (DOCKER_HOST=tcp://.../docker/nodes/<id>)
#   sc ARGS...            curl to the server from the management namespace, trusting its CA
#   metric NAME           a value from the server's /metrics (as the admin, $ADMIN_TOKEN)
#
# Sourced by run.sh after common.sh; uses the variables run.sh sets (W, BIN, NS_*, ...).

# === time and steps ===

now() { date +%s.%N; }
# since T0: seconds since T0, two decimals.
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
# fcmp A OP B: floating-point comparison (OP one of < <= > >=).
fcmp() { awk -v a="$1" -v b="$3" -v op="$2" 'BEGIN {
    if (op == "<") exit !(a < b); if (op == "<=") exit !(a <= b)
    if (op == ">") exit !(a > b); if (op == ">=") exit !(a >= b); exit 2 }'; }

E2E_T0="$(now)"
STEP_NO=0
STEP_TITLE=""
STEP_T0=""
STEP_STATUS=""
SUMMARY=()
SKIPS=()
FAILED_STEP=""

_step_close() {
    [[ -n "$STEP_T0" ]] || return 0
    local took; took="$(since "$STEP_T0")"
    local status="${STEP_STATUS:-PASS}"
    printf '[e2e %7.1fs]      step %d %s in %ss\n' "$(since "$E2E_T0")" "$STEP_NO" "$status" "$took"
    SUMMARY+=("$(printf '%3d. %-8s %7ss  %s' "$STEP_NO" "$status" "$took" "$STEP_TITLE")")
    STEP_T0=""
}

# part "title": a heading for a group of steps.
part() {
    _step_close
    printf '\n[e2e %7.1fs] ======== %s ========\n' "$(since "$E2E_T0")" "$*"
}

# step "title": starts a numbered step (closing the previous one with its time).
step() {
    _step_close
    STEP_NO=$((STEP_NO + 1))
    STEP_TITLE="$*"
    STEP_STATUS=""
    STEP_T0="$(now)"
    printf '\n[e2e %7.1fs] ==> %d. %s\n' "$(since "$E2E_T0")" "$STEP_NO" "$*"
    if [[ "${E2E_HOLD_AT:-}" == "$STEP_NO" ]]; then   # debugging: stop here with everything running
        info "E2E_HOLD_AT=$STEP_NO: holding (at most 30 min); environment in $W/env; touch $W/continue to go on"
        declare -p W BIN NS_MGMT NS_DOWN MGMT_IP SERVER_PORT SERVER_URL CLUSTER_ID NODE_ID ADMIN_TOKEN ALICE_TOKEN BOB_TOKEN 2>/dev/null >"$W/env" || true
        local deadline=$((SECONDS + 1800))
        while [[ ! -e "$W/continue" ]] && ((SECONDS < deadline)); do sleep 1; done
    fi
}

# skip "reason": marks the current step SKIPPED, loudly; the caller returns from the step.
skip() {
    printf '[e2e %7.1fs] SKIPPED: %s\n' "$(since "$E2E_T0")" "$*" >&2
    printf '[e2e %7.1fs] SKIPPED: %s\n' "$(since "$E2E_T0")" "$*"
    STEP_STATUS=SKIPPED
    SKIPS+=("step $STEP_NO ($STEP_TITLE): $*")
    # scripts/test.sh collects skips of every part, so that it never reports a full pass.
    if [[ -n "${TEST_SKIP_FILE:-}" ]]; then echo "e2e step $STEP_NO ($STEP_TITLE): $*" >>"$TEST_SKIP_FILE"; fi
}

# shellcheck disable=SC2034  # FAILED_STEP is read by run.sh's EXIT trap
# fail "message": the current step fails; the suite stops (the EXIT trap cleans up).
fail() {
    FAILED_STEP="step $STEP_NO ($STEP_TITLE)"
    STEP_STATUS=FAIL
    printf '[e2e %7.1fs] FAIL %s\n' "$(since "$E2E_T0")" "$*" >&2
    exit 1
}

# check COND_CMD... -- message: fail with message unless the command succeeds.
expect() {
    local msg="$1"; shift
    "$@" || fail "$msg"
}

# wait_until SECONDS DESCRIPTION CMD...: polls CMD every 0.25 s; prints how long it took.
# Returns 1 on timeout (the caller decides).
WAITED=""
wait_until() {
    local secs="$1" what="$2"; shift 2
    local t0; t0="$(now)"
    local deadline=$((SECONDS + secs))
    while :; do
        if "$@" >/dev/null 2>&1; then
            WAITED="$(since "$t0")"
            return 0
        fi
        ((SECONDS < deadline)) || break
        sleep 0.25
    done
    WAITED="$(since "$t0")"
    warn "timed out after ${secs}s waiting for: $what"
    return 1
}

# === the end of a suite ===

RESULTS=""
# result "what" "figure": a line of the timings table printed at the end.
result() { RESULTS+="$(printf '  %-64s %s' "$1" "$2")"$'\n'; }

# suite_report RC: the step summary, skipped steps, the timings table, and the verdict.
suite_report() {
    local rc="$1"
    if ((${#SUMMARY[@]})); then
        printf '\n[e2e] summary (total %ss):\n' "$(since "$E2E_T0")"
        printf '  %s\n' "${SUMMARY[@]}"
    fi
    if ((${#SKIPS[@]})); then
        printf '\n[e2e] SKIPPED steps:\n'
        printf '  SKIPPED: %s\n' "${SKIPS[@]}"
    fi
    if [[ -n "$RESULTS" ]]; then printf '\n[e2e] timings:\n%s' "$RESULTS"; fi
    if [[ $rc == 0 ]]; then
        printf '\n[e2e] PASSED in %ss\n' "$(since "$E2E_T0")"
    else
        printf '\n[e2e] FAILED at %s (exit %s) after %ss\n' "${FAILED_STEP:-step $STEP_NO ($STEP_TITLE)}" "$rc" "$(since "$E2E_T0")"
    fi
}

# cleanup_begin RC: the start of every suite's EXIT handler: false when cleanup already ran;
# otherwise stops failing on errors (cleanup goes on past them) and closes the open step,
# marking it failed when the suite exits non-zero.
CLEANED=0
cleanup_begin() {
    ((CLEANED)) && return 1
    CLEANED=1
    set +eE
    trap - ERR
    [[ $1 == 0 || -n "$STEP_STATUS" ]] || STEP_STATUS=FAIL
    _step_close 2>/dev/null
    return 0
}

# suite_traps CLEANUP_FUNCTION: a failed command fails its step (and names its line), EXIT runs
# CLEANUP_FUNCTION, INT and TERM end the suite (through EXIT).
suite_traps() {
    trap 'on_err $? $LINENO "$BASH_COMMAND"' ERR
    # shellcheck disable=SC2064  # the function's name is fixed now
    trap "$1" EXIT
    trap 'warn "interrupted"; exit 130' INT TERM
}
on_err() {
    ((BASH_SUBSHELL == 0)) || return 0
    FAILED_STEP="${FAILED_STEP:-step $STEP_NO ($STEP_TITLE)}"
    STEP_STATUS=FAIL
    printf '[e2e] FAIL: command failed (exit %s) at %s line %s: %s\n' "$1" "$(basename "$0")" "$2" "$3" >&2
}

# === processes ===

# bg_run NAME NETNS LOG CMD...: runs CMD detached in network namespace NETNS (empty: here) in a
# new session, so NAME's pid is also its process group; records it in $W/pids/NAME.pid.
bg_run() {
    local name="$1" ns="$2" log="$3"; shift 3
    if [[ -n "$ns" ]]; then
        setsid nsenter --net="/run/netns/$ns" -- "$@" >>"$log" 2>&1 </dev/null &
    else
        setsid "$@" >>"$log" 2>&1 </dev/null &
    fi
    echo $! >"$W/pids/$name.pid"
}

pid_of() { cat "$W/pids/$1.pid" 2>/dev/null; }
alive() { local p; p="$(pid_of "$1")" && [[ -n "$p" ]] && kill -0 "$p" 2>/dev/null; }

# stop_bg NAME [SIGNAL] [GRACE]: signals NAME's process group, waits at most GRACE seconds,
# then KILLs the group. Removes the pidfile.
stop_bg() {
    local name="$1" sig="${2:-TERM}" grace="${3:-10}" pid
    pid="$(pid_of "$name")" || return 0
    [[ -n "$pid" ]] || return 0
    kill "-$sig" -- "-$pid" 2>/dev/null || kill "-$sig" "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + grace))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        warn "$name (pid $pid) still alive after ${grace}s: KILL"
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    # reap if it is our child
    wait "$pid" 2>/dev/null || true
    rm -f "$W/pids/$name.pid"
}

# fd_count NAME: open file descriptors of NAME's process.
fd_count() { local p; p="$(pid_of "$1")"; find "/proc/$p/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
# thread_count NAME
thread_count() { local p; p="$(pid_of "$1")"; awk '/^Threads:/ {print $2}' "/proc/$p/status" 2>/dev/null; }

# === tools ===

inm() { ip netns exec "$NS_MGMT" "$@"; }
ind() { ip netns exec "$NS_DOWN" "$@"; }

# A clean environment: nothing from the caller's (proxies, KUBECONFIG, DOCKER_*) leaks in.
cleanenv() { env -i PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" HOME="$W/home" LANG=C.UTF-8 "$@"; }

ts() { inm env -i PATH=/usr/bin:/bin RUST_LOG=warn "$BIN/tunnel-server" --data-dir "$W/server" "$@"; }

kc() {
    local user="$1"; shift
    inm env -i PATH=/usr/bin:/bin HOME="$W/home" KUBECONFIG="$W/$user.kubeconfig" "$KUBECTL" "$@"
}
# kc_distro USER ARGS...: the same with Debian's /usr/bin/kubectl (an older release).
kc_distro() {
    local user="$1"; shift
    inm env -i PATH=/usr/bin:/bin HOME="$W/home" KUBECONFIG="$W/$user.kubeconfig" /usr/bin/kubectl "$@"
}
kd() { "$W/k8s/kubectl" "$@"; }

dk() {
    inm env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$W/home" \
        DOCKER_HOST="tcp://$MGMT_IP:$SERVER_PORT/docker/nodes/$NODE_ID" \
        DOCKER_TLS_VERIFY=1 DOCKER_CERT_PATH="$W/docker-certs" DOCKER_CONFIG="$W/docker-config" \
        docker "$@"
}
# The docker CLI command line for tmux (one string).
dk_cmdline() {
    printf 'ip netns exec %q env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=%q TERM=xterm DOCKER_HOST=%q DOCKER_TLS_VERIFY=1 DOCKER_CERT_PATH=%q DOCKER_CONFIG=%q docker' \
        "$NS_MGMT" "$W/home" "tcp://$MGMT_IP:$SERVER_PORT/docker/nodes/$NODE_ID" "$W/docker-certs" "$W/docker-config"
}

sc() { inm curl -sS --cacert "$W/server/ca.pem" "$@"; }
# code_and_time TOKEN URL_PATH [MAX]: "<http code> <seconds>" of one GET through the server.
code_and_time() {
    sc -o /dev/null --max-time "${3:-20}" -w '%{http_code} %{time_total}' \
        -H "Authorization: Bearer $1" "$SERVER_URL$2" 2>/dev/null || true
}

# /metrics on the main listener takes an admin's API token.
metrics() { sc --max-time 5 -H "Authorization: Bearer $ADMIN_TOKEN" "$SERVER_URL/metrics"; }
metric() { metrics | awk -v n="$1" '$1 == n { print $2 }'; }

# api PATH: the /v1 management API as the e2e admin.
api() { sc --max-time 5 -H "Authorization: Bearer $ADMIN_TOKEN" "$SERVER_URL$1"; }

cluster_connected() {   # both tunnels of the cluster agent are registered
    local j; j="$(api "/v1/clusters/$CLUSTER_ID")" || return 1
    [[ "$(jq -r '.tunnel and .aggregationTunnel' <<<"$j")" == true ]]
}
cluster_disconnected() {
    local j; j="$(api "/v1/clusters/$CLUSTER_ID")" || return 1
    [[ "$(jq -r '.tunnel' <<<"$j")" == false ]]
}
node_connected() {
    local j; j="$(api "/v1/nodes/$NODE_ID")" || return 1
    [[ "$(jq -r '.connected' <<<"$j")" == true ]]
}
node_disconnected() {
    local j; j="$(api "/v1/nodes/$NODE_ID")" || return 1
    [[ "$(jq -r '.connected' <<<"$j")" == false ]]
}
# agent_streams NAME: streams the agent NAME serves now (its main tunnel).
agent_streams() {
    ind curl -s --max-time 2 "http://127.0.0.1:$(cat "$W/agents/$1/health-port")/metrics" |
        awk '/^cattle_agent_streams_open\{tunnel="main"\}/ { print $2 }'
}
# streams_report: "server N (P pooled), ca3 N, na2 N" for the agents alive now. The server keeps
# idle upstream HTTP connections for reuse (60 s); each holds one stream open on its agent.
streams_report() {
    local out pf a
    out="server $(metric tunnel_server_streams) ($(metric tunnel_server_upstream_pooled_connections) pooled)"
    for pf in "$W"/pids/ca*.pid "$W"/pids/na*.pid; do
        [[ -e "$pf" ]] || continue
        a="$(basename "$pf" .pid)"
        alive "$a" && out+=", $a $(agent_streams "$a")"
    done
    printf '%s' "$out"
}
# all_streams_closed: no stream open beyond the server's pooled connections, on the server and
# summed over the agents.
all_streams_closed() {
    local r pooled server agents
    r="$(streams_report)"
    [[ "$r" =~ ^server\ ([0-9]+)\ \(([0-9]+)\ pooled\) ]] || return 1
    server="${BASH_REMATCH[1]}"; pooled="${BASH_REMATCH[2]}"
    agents="$(grep -oE ', [a-z]+[0-9]+ [0-9]+' <<<"$r" | awk '{ s += $3 } END { print s + 0 }')"
    ((server == pooled && agents == pooled))
}
# streams_drain: waits (at most 15 s) until no stream is open on the server or the agents
# beyond the pooled connections; fails otherwise.
streams_drain() {
    info "open streams now: $(streams_report)"
    wait_until 15 "all streams closed" all_streams_closed || fail "streams still open after 15 s: $(streams_report)"
    ok "no stream open on the server or the agents but the pooled connections (after ${WAITED}s): $(streams_report)"
}
sessions_are() { [[ "$(metric tunnel_server_sessions)" == "$1" ]]; }
streams_are() { [[ "$(metric tunnel_server_streams)" == "$1" ]]; }
kube_works() { kc alice get ns default -o name --request-timeout=5s; }
docker_works() { dk version --format '{{.Server.Version}}'; }

# indent: prefix every line for the report.
indent() { sed 's/^/        /'; }

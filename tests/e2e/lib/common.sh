# shellcheck shell=bash
# Shared helpers for the e2e scripts. Source it; do not execute it.
#
#   . "$(dirname "${BASH_SOURCE[0]}")/common.sh"
#
# Everything here is plain bash; no helper loops without a time bound.

if [[ -n "${_TPE2E_COMMON_LOADED:-}" ]]; then return 0; fi
_TPE2E_COMMON_LOADED=1

export E2E_LIB_DIR; E2E_LIB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
E2E_CACHE="${E2E_CACHE:-${HOME:-/root}/.cache/tunnel-e2e}"
export E2E_CACHE

_tpe2e_name="$(basename "${0:-e2e}" .sh)"

# step "message": a numbered, visible step.
_tpe2e_step_no=0
step() {
    _tpe2e_step_no=$((_tpe2e_step_no + 1))
    printf '\n[%s] ==> %d. %s\n' "$_tpe2e_name" "$_tpe2e_step_no" "$*"
}
info() { printf '[%s]     %s\n' "$_tpe2e_name" "$*"; }
ok()   { printf '[%s]  OK %s\n' "$_tpe2e_name" "$*"; }
warn() { printf '[%s] WARN %s\n' "$_tpe2e_name" "$*" >&2; }
die()  { printf '[%s] FAIL %s\n' "$_tpe2e_name" "$*" >&2; exit 1; }

need_root() {
    [[ "$(id -u)" == 0 ]] || die "must run as root (uses ip netns / dockerd / apt-get)"
}

need_cmd() {
    local c
    for c in "$@"; do
        command -v "$c" >/dev/null 2>&1 || die "missing command '$c' (run tests/e2e/lib/deps.sh)"
    done
}

# wait_for SECONDS DESCRIPTION CMD...: polls CMD every 0.2 s until it succeeds,
# at most SECONDS. Returns 1 (does not exit) on timeout.
wait_for() {
    local secs="$1" what="$2"; shift 2
    local deadline=$((SECONDS + secs))
    while (( SECONDS < deadline )); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    warn "timed out after ${secs}s waiting for: $what"
    return 1
}

# pid_alive PIDFILE: true when the file names a live process.
pid_alive() {
    local f="$1" pid
    [[ -s "$f" ]] || return 1
    pid="$(cat "$f" 2>/dev/null)" || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null
}

# stop_pidfile PIDFILE NAME [GRACE_SECONDS]: TERM, wait, then KILL, the one
# process named in PIDFILE (never by name). Removes the pidfile.
stop_pidfile() {
    local f="$1" name="$2" grace="${3:-15}" pid
    if ! pid_alive "$f"; then
        rm -f "$f"
        info "$name: not running"
        return 0
    fi
    pid="$(cat "$f")"
    info "$name: sending TERM to pid $pid"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + grace))
    while (( SECONDS < deadline )) && kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
        warn "$name: still alive after ${grace}s, sending KILL to pid $pid"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$f"
    ok "$name stopped"
}

# free_port [IP] [NETNS]: a TCP port nobody listens on right now.
free_port() {
    local ip="${1:-127.0.0.1}" ns="${2:-}"
    in_netns "$ns" python3 - "$ip" <<'PY'
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.bind((sys.argv[1], 0))
print(s.getsockname()[1])
s.close()
PY
}

# in_netns NS CMD...: run CMD in namespace NS, or directly when NS is empty.
in_netns() {
    local ns="$1"; shift
    if [[ -n "$ns" ]]; then ip netns exec "$ns" "$@"; else "$@"; fi
}

# heavy CMD...: run a CPU/IO heavy command at the lowest priority.
heavy() {
    nice -n 19 ionice -c3 "$@"
}

#!/usr/bin/env bash
# A private, real dockerd (Debian docker.io) that cannot clash with a system
# docker: own socket, data root, exec root, pidfile, config file and
# containerd namespace, and its own supervised containerd.
#
#   tests/e2e/lib/dockerd.sh start  DIR [NETNS]   start (no-op if running); prints the socket
#   tests/e2e/lib/dockerd.sh stop   DIR           stop it (TERM, then KILL after 30 s),
#                                                 unmount leftovers; keeps DIR/data (image cache)
#   tests/e2e/lib/dockerd.sh purge  DIR           stop, then delete DIR entirely
#   tests/e2e/lib/dockerd.sh status DIR           exit 0 when it answers
#   tests/e2e/lib/dockerd.sh env    DIR           print `export DOCKER_HOST=unix://DIR/docker.sock`
#
# NETNS (optional): run dockerd inside that network namespace (nsenter --net,
# same mount namespace), so `--network host` containers live in it.
#
# Environment:
#   DOCKERD_STORAGE_DRIVER  force a storage driver (default: overlay2, and vfs
#                           when overlay2 does not work here)
#   DOCKERD_START_TIMEOUT   seconds to wait for the API (default 30)
#   DOCKERD_EXTRA_ARGS      appended to the dockerd command line
#   DOCKERD_RUN_DIR         a directory that is this daemon's /run (= /var/run): dockerd runs
#                           in a private mount namespace (a slave of the host's, so mounts made
#                           on the host still reach it) with DOCKERD_RUN_DIR bind-mounted on
#                           /run, and listens on /run/docker.sock there too. A container's
#                           hostPath /var/run then is this node's, with this node's socket in it
#                           (cluster.sh: one per node; the node agent's DaemonSet mounts it).
#
# Networking: --bridge=none --iptables=false --ip6tables=false --ip-masq=false:
# no docker0, no iptables rules, so nothing outside our namespaces is touched.
# Containers use `--network none` or `--network host` only.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,24p' "$0"; exit "${1:-2}"; }

cmd="${1:-}"; dir="${2:-}"; netns="${3:-}"
[[ -n "$cmd" && -n "$dir" ]] || usage
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
SOCK="$dir/docker.sock"
PIDFILE="$dir/dockerd.pid"
LOG="$dir/dockerd.log"
DOCKER_TIMEOUT="${DOCKERD_START_TIMEOUT:-30}"
# Unique per DIR, so two private daemons never share containerd state.
NS_ID="tpe2e-$(printf '%s' "$dir" | sha1sum | cut -c1-10)"

d() { docker -H "unix://$SOCK" "$@"; }

answers() { [[ -S "$SOCK" ]] && timeout 5 docker -H "unix://$SOCK" version >/dev/null 2>&1; }

# Unmount anything left mounted below DIR (overlay layers, shm, netns files).
unmount_below() {
    local m n=0
    # deepest first
    while read -r m; do
        umount -l "$m" 2>/dev/null && n=$((n + 1)) || true
    done < <(awk -v p="$dir/" 'index($2, p) == 1 { print $2 }' /proc/self/mounts | sort -r)
    ((n == 0)) || info "unmounted $n leftover mount(s) below $dir"
}

start_once() {   # $1 = storage driver; returns 0 when the API answers
    local driver="$1"
    rm -f "$SOCK" "$PIDFILE"
    cat >"$dir/daemon.json" <<EOF
{
  "storage-driver": "$driver",
  "log-driver": "json-file",
  "log-opts": { "max-size": "10m", "max-file": "2" }
}
EOF
    local args=(
        --host "unix://$SOCK"
        --data-root "$dir/data"
        --exec-root "$dir/exec"
        --pidfile "$PIDFILE"
        --config-file "$dir/daemon.json"
        --containerd-namespace "$NS_ID"
        --containerd-plugins-namespace "$NS_ID-plugins"
        --bridge=none --iptables=false --ip6tables=false --ip-masq=false --ip-forward=false
        --userland-proxy=false
        --exec-opt native.cgroupdriver=cgroupfs
        --cgroup-parent "/$NS_ID"
    )
    # shellcheck disable=SC2206
    [[ -n "${DOCKERD_EXTRA_ARGS:-}" ]] && args+=(${DOCKERD_EXTRA_ARGS})
    info "dockerd ${args[*]}"
    {
        echo "=== $(date -u +%FT%TZ) starting with storage driver $driver ${netns:+in netns $netns}"
    } >>"$LOG"
    local launch=(dockerd)
    if [[ -n "${DOCKERD_RUN_DIR:-}" ]]; then
        mkdir -p "$DOCKERD_RUN_DIR"
        rm -f "$DOCKERD_RUN_DIR/docker.sock"
        args+=(--host unix:///run/docker.sock)
        # shellcheck disable=SC2016  # expanded by the inner sh
        launch=(unshare --mount --propagation slave -- sh -c 'mount --bind "$0" /run && exec dockerd "$@"' "$DOCKERD_RUN_DIR")
        info "own /run: $DOCKERD_RUN_DIR (private mount namespace)"
    fi
    if [[ -n "$netns" ]]; then
        [[ -e "/run/netns/$netns" ]] || die "network namespace $netns does not exist (run netns.sh up)"
        setsid nsenter --net="/run/netns/$netns" "${launch[@]}" "${args[@]}" >>"$LOG" 2>&1 </dev/null &
    else
        setsid "${launch[@]}" "${args[@]}" >>"$LOG" 2>&1 </dev/null &
    fi
    local launcher=$!
    local deadline=$((SECONDS + DOCKER_TIMEOUT))
    while (( SECONDS < deadline )); do
        if answers; then return 0; fi
        if ! kill -0 "$launcher" 2>/dev/null; then
            warn "dockerd exited during start-up; last log lines:"
            tail -n 15 "$LOG" >&2
            return 1
        fi
        sleep 0.3
    done
    warn "dockerd did not answer within ${DOCKER_TIMEOUT}s; last log lines:"
    tail -n 15 "$LOG" >&2
    kill -TERM "$launcher" 2>/dev/null || true
    sleep 2
    kill -KILL "$launcher" 2>/dev/null || true
    return 1
}

do_start() {
    need_root
    need_cmd dockerd containerd runc docker nsenter setsid
    step "private dockerd in $dir"
    if pid_alive "$PIDFILE" && answers; then
        ok "already running (pid $(cat "$PIDFILE"))"
        echo "$SOCK"
        return 0
    fi
    if pid_alive "$PIDFILE"; then
        warn "pid $(cat "$PIDFILE") in $PIDFILE does not answer; stopping it first"
        do_stop
    fi
    unmount_below
    mkdir -p "$dir/data" "$dir/exec"

    local drivers
    if [[ -n "${DOCKERD_STORAGE_DRIVER:-}" ]]; then
        drivers=("$DOCKERD_STORAGE_DRIVER")
    elif [[ -s "$dir/storage-driver" ]]; then
        drivers=("$(cat "$dir/storage-driver")")   # what worked last time
    else
        drivers=(overlay2 vfs)
    fi
    local driver started=""
    for driver in "${drivers[@]}"; do
        step "starting dockerd (storage driver $driver, wait <= ${DOCKER_TIMEOUT}s)"
        if start_once "$driver"; then
            # The storage driver may silently not be what we asked for.
            local actual
            actual="$(d info --format '{{.Driver}}' 2>/dev/null || echo '?')"
            if [[ "$actual" != "$driver" ]]; then
                warn "asked for $driver, daemon uses $actual"
            fi
            started="$driver"
            break
        fi
        warn "storage driver $driver failed"
        if pid_alive "$PIDFILE"; then stop_pidfile "$PIDFILE" dockerd 30; fi
        unmount_below
    done
    [[ -n "$started" ]] || die "dockerd did not start with any of: ${drivers[*]} (log: $LOG)"
    echo "$started" >"$dir/storage-driver"

    step "verifying"
    info "server: $(d version --format 'Docker Engine {{.Server.Version}} (API {{.Server.APIVersion}}), client {{.Client.Version}}')"
    info "info:   $(d info --format 'driver={{.Driver}} cgroup={{.CgroupDriver}} cgroupv={{.CgroupVersion}} runtime={{.DefaultRuntime}} root={{.DockerRootDir}}')"
    ok "dockerd pid $(cat "$PIDFILE") answers on unix://$SOCK"
    echo "$SOCK"
}

do_stop() {
    step "stopping private dockerd in $dir"
    if pid_alive "$PIDFILE" && answers; then
        local ids
        ids="$(d ps -q 2>/dev/null || true)"
        if [[ -n "$ids" ]]; then
            info "removing $(wc -w <<<"$ids") running container(s)"
            # shellcheck disable=SC2086
            timeout 60 docker -H "unix://$SOCK" rm -f $ids >/dev/null 2>&1 || warn "docker rm -f failed"
        fi
    fi
    stop_pidfile "$PIDFILE" dockerd 30
    # The supervised containerd normally exits with dockerd; make sure.
    local cpid="$dir/exec/containerd/containerd.pid"
    if pid_alive "$cpid"; then stop_pidfile "$cpid" containerd 10; fi
    unmount_below
    # Empty cgroup parents left by --cgroup-parent (cgroup v1 and v2 layouts).
    local cg n=0
    for cg in /sys/fs/cgroup/*/"$NS_ID" /sys/fs/cgroup/"$NS_ID"; do
        [[ -d "$cg" ]] || continue
        # children first; rmdir fails (harmlessly) on a cgroup that still has tasks
        while read -r sub; do rmdir "$sub" 2>/dev/null && n=$((n + 1)) || true; done \
            < <(find "$cg" -mindepth 1 -type d 2>/dev/null | sort -r)
        rmdir "$cg" 2>/dev/null && n=$((n + 1)) || true
    done
    ((n == 0)) || info "removed $n empty cgroup dir(s) named $NS_ID"
    rm -f "$SOCK"
    ok "stopped"
}

case "$cmd" in
    start)  do_start ;;
    stop)   do_stop ;;
    purge)  do_stop; step "deleting $dir"; rm -rf "$dir"; ok "purged" ;;
    status) if answers; then ok "answers on unix://$SOCK"; else info "not answering on unix://$SOCK"; exit 1; fi ;;
    env)    echo "export DOCKER_HOST=unix://$SOCK" ;;
    -h|--help|help) usage 0 ;;
    *) usage ;;
esac

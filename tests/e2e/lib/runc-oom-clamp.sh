#!/usr/bin/env bash
# OCI runtime wrapper for the cluster's dockerds (cluster.sh registers it with
# `dockerd --add-runtime tpe2e-runc=THIS --default-runtime tpe2e-runc`, and only when root
# lacks CAP_SYS_RESOURCE).
#
# Why: without CAP_SYS_RESOURCE no process may lower an oom_score_adj, and the kubelet/
# cri-dockerd give every pod sandbox (pause) -998 and Guaranteed pods' containers -997. runc
# then dies in `runc init` ("can't get final child's PID from pipe: EOF") and no pod ever
# starts. This machine's root has every capability but CAP_SYS_RESOURCE. The wrapper raises a
# negative process.oomScoreAdj in the bundle's config.json (create/run) or the --process
# file (exec) to 0, and runs the real runc with the same arguments. Nothing else changes.
set -euo pipefail
RUNC="${TPE2E_RUNC:-/usr/sbin/runc}"

clamp() {   # clamp FILE JQPATH: raise a negative oomScoreAdj at JQPATH to 0, in place
    local f="$1" path="$2" v
    [[ -f "$f" ]] || return 0
    v="$(jq -r "$path.oomScoreAdj // 0" "$f" 2>/dev/null || echo 0)"
    [[ "$v" =~ ^-[0-9]+$ ]] || return 0
    jq -c "$path.oomScoreAdj = 0" "$f" >"$f.tpe2e-tmp" && mv "$f.tpe2e-tmp" "$f"
}

args=("$@")
cmd="" bundle="" process=""
for ((i = 0; i < ${#args[@]}; i++)); do
    a="${args[i]}"
    case "$a" in
        --bundle|-b) bundle="${args[i + 1]:-}" ;;
        --bundle=*) bundle="${a#--bundle=}" ;;
        --process|-p) process="${args[i + 1]:-}" ;;
        --process=*) process="${a#--process=}" ;;
        create|run|exec) [[ -n "$cmd" ]] || cmd="$a" ;;
    esac
done
case "$cmd" in
    create|run) [[ -z "$bundle" ]] || clamp "$bundle/config.json" .process ;;
    exec) [[ -z "$process" ]] || clamp "$process" "" ;;
esac
exec "$RUNC" "$@"

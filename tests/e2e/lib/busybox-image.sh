#!/usr/bin/env bash
# Build a tiny container image with `docker import` from a root filesystem
# made of Debian's busybox-static: no registry is needed (none is reachable).
#
#   tests/e2e/lib/busybox-image.sh DOCKER_SOCKET [TAG] [--verify]
#
#   DOCKER_SOCKET  path of the daemon socket (or unix://PATH)
#   TAG            image tag (default tpe2e/busybox:latest)
#   --verify       afterwards: run --rm echo, run -d sleep + exec + ps + logs,
#                  then remove the test container
#
# Idempotent: the import is skipped when TAG exists and was built from the same
# /bin/busybox (its sha256 is recorded in the image comment).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

[[ $# -ge 1 ]] || { sed -n '2,14p' "$0"; exit 2; }
sock="${1#unix://}"
tag="tpe2e/busybox:latest"
verify=0
shift
for a in "$@"; do
    case "$a" in
        --verify) verify=1 ;;
        -*) die "unknown flag $a" ;;
        *) tag="$a" ;;
    esac
done
[[ -S "$sock" ]] || die "no docker socket at $sock (start one with dockerd.sh start DIR)"
need_cmd docker tar sha256sum
d() { timeout 120 docker -H "unix://$sock" "$@"; }

BUSYBOX="${BUSYBOX:-/bin/busybox}"
step "checking $BUSYBOX"
[[ -x "$BUSYBOX" ]] || die "$BUSYBOX missing (apt-get install busybox-static, or run deps.sh)"
if command -v file >/dev/null 2>&1; then
    ftype="$(file -b "$BUSYBOX" 2>/dev/null || true)"
    [[ "$ftype" == *"statically linked"* ]] || die "$BUSYBOX is not statically linked: install busybox-static"
fi
sum="$(sha256sum "$BUSYBOX" | cut -d' ' -f1)"
bbver="$("$BUSYBOX" 2>&1 || true)"
bbver="${bbver%%$'\n'*}"; bbver="$(awk '{print $2}' <<<"$bbver")"
comment="tpe2e busybox-static $bbver sha256:$sum"
info "busybox $bbver sha256 $sum"

step "image $tag"
existing="$(d image inspect --format '{{.Comment}}' "$tag" 2>/dev/null || true)"
if [[ "$existing" == "$comment" ]]; then
    ok "already present, built from the same busybox (skip import)"
else
    [[ -z "$existing" ]] || info "present but stale ('$existing'); rebuilding"
    rootfs="$(mktemp -d /tmp/tpe2e-rootfs.XXXXXX)"
    trap 'rm -rf "$rootfs"' EXIT
    mkdir -p "$rootfs"/{bin,sbin,usr/bin,usr/sbin,etc,tmp,root,proc,sys,dev,var/tmp,home}
    chmod 1777 "$rootfs/tmp" "$rootfs/var/tmp"
    cp "$BUSYBOX" "$rootfs/bin/busybox"
    n=0
    for applet in $("$BUSYBOX" --list); do
        [[ "$applet" == busybox ]] && continue
        ln -sf busybox "$rootfs/bin/$applet"
        n=$((n + 1))
    done
    ln -sf ../../bin/env "$rootfs/usr/bin/env"
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$rootfs/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$rootfs/etc/group"
    info "root filesystem: /bin/busybox + $n applet symlinks ($(du -sh "$rootfs" | cut -f1))"
    tar -C "$rootfs" --numeric-owner --owner=0 --group=0 -cf - . |
        d import \
            --message "$comment" \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'CMD ["/bin/sh"]' \
            - "$tag" >/dev/null
    ok "imported $tag ($(d image inspect --format '{{.Id}} {{.Size}} bytes' "$tag"))"
fi

if ((verify)); then
    name="tpe2e-verify-$$"
    step "verify: docker run --rm --network none $tag echo hi"
    out="$(d run --rm --network none "$tag" echo hi)"
    [[ "$out" == hi ]] || die "expected 'hi', got '$out'"
    ok "printed: $out"

    step "verify: docker run -d --name $name --network none $tag sh -c 'echo started; sleep 1000'"
    d rm -f "$name" >/dev/null 2>&1 || true
    cid="$(d run -d --name "$name" --network none "$tag" sh -c 'echo started; exec sleep 1000')"
    trap 'docker -H "unix://$sock" rm -f "$name" >/dev/null 2>&1 || true; rm -rf "${rootfs:-/nonexistent-tpe2e}"' EXIT
    ok "container ${cid:0:12}"

    step "verify: docker exec $name cat /etc/passwd; ls /bin | wc -l"
    out="$(d exec "$name" sh -c 'head -1 /etc/passwd; ls /bin | wc -l; echo pid1=$(cat /proc/1/comm)')"
    printf '%s\n' "$out" | sed 's/^/        /'
    grep -q '^pid1=sleep$' <<<"$out" || die "unexpected exec output"
    ok "exec works"

    step "verify: docker exec -i (stdin piped)"
    out="$(echo piped-stdin | d exec -i "$name" cat)"
    [[ "$out" == piped-stdin ]] || die "exec -i got '$out'"
    ok "exec -i works"

    if command -v tmux >/dev/null 2>&1; then
        step "verify: docker exec -it (a real TTY, driven through tmux)"
        tses="tpe2e-bbverify-$$"
        tmux new-session -d -s "$tses" -x 100 -y 20 "docker -H unix://$sock exec -it $name sh"
        screen=""
        for _ in $(seq 1 50); do   # <= 10 s
            screen="$(tmux capture-pane -p -t "$tses" 2>/dev/null || true)"
            [[ "$screen" == *'# '* ]] && break
            sleep 0.2
        done
        tmux send-keys -t "$tses" 'echo tty-answer-$((6*7)); tty' Enter
        for _ in $(seq 1 50); do
            screen="$(tmux capture-pane -p -t "$tses" 2>/dev/null || true)"
            [[ "$screen" == *'/dev/pts/'* ]] && break
            sleep 0.2
        done
        tmux send-keys -t "$tses" 'exit' Enter
        sleep 0.5
        tmux kill-session -t "$tses" 2>/dev/null || true
        grep -v '^$' <<<"$screen" | sed 's/^/        /'
        [[ "$screen" == *tty-answer-42* && "$screen" == *'/dev/pts/'* ]] || die "interactive exec did not answer"
        ok "exec -it works"
    fi

    step "verify: docker ps"
    d ps --filter "name=$name" --format '        {{.ID}} {{.Image}} {{.Status}} {{.Names}}'
    [[ -n "$(d ps -q --filter "name=$name")" ]] || die "container not in docker ps"
    ok "listed"

    step "verify: docker logs $name"
    out="$(d logs "$name" 2>&1)"
    [[ "$out" == started ]] || die "logs gave '$out'"
    ok "logs: $out"

    step "verify: docker run --rm --network host $tag ip addr"
    d run --rm --network host "$tag" ip -o -4 addr | sed 's/^/        /' || die "--network host failed"
    ok "host networking works"

    step "verify: cleanup"
    d rm -f "$name" >/dev/null
    ok "all verify steps passed"
fi
echo "$tag"

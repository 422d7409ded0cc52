# shellcheck shell=bash
# shellcheck disable=SC2016,SC2034,SC2317  # '$((…))' is typed into the pod's shell; interface variables; helpers called indirectly
# Streams into real pods through the server (issue 15): kubectl exec -it (both of kubectl's
# streaming protocols), exec -i with stdin's end, attach and detach, port-forward, cp, logs -f,
# run --rm -it, debug with an ephemeral container, an audit line and a metric for each, and RBAC
# on exec for an impersonated user. The path is kubectl -> tunnel-server -> tunnel ->
# kube-apiserver -> kubelet -> cri-dockerd -> dockerd, through HTTP upgrades the server splices.
#
# Shared by tests/e2e/pods.sh and tests/kind/run.sh; sourced after suite-lib.sh and
# pods-steps.sh, whose interface it uses (kd, kc, KC_ARGV, ts, api, SUSER, W, CLUSTER_ID,
# BUSYBOX_IMAGE; namespace pods-e2e from pods_workload), plus:
#   kc_cmdline USER [VAR=VALUE...]  kubectl as USER as one shell command line (for tmux), with
#                                   the given environment
#   on_mgmt CMD...                  runs CMD on the management host (where kubectl runs)
#   server_log                      prints the server's log so far (its audit lines)
#   TMUX_SOCK                       the tmux server (-L) this suite owns and kills at its end

NSP=pods-e2e

tmx() { tmux -L "$TMUX_SOCK" "$@"; }
pane() { tmx capture-pane -p -J -t "$1" 2>/dev/null; }
pane_has() { [[ "$(pane "$1")" == *"$2"* ]]; }
# pane_line S TEXT: a line of the pane is exactly TEXT (output, not the echo of the command).
pane_line() { pane "$1" | grep -qxF -- "$2"; }
# after_line S MARK: the line after the last line that is exactly MARK.
after_line() { pane "$1" | awk -v m="$2" '$0 == m { getline n; v = n } END { print v }'; }
keys() { local s="$1"; shift; tmx send-keys -t "$s" "$@"; }
# pane_size S: "ROWS COLUMNS" of the pane, as stty size prints it.
pane_size() { tmx display-message -p -t "$1" '#{pane_height} #{pane_width}'; }
server_streams() { metric tunnel_server_streams; }
# proxied_by_status: the server's k8s request counters for this cluster, "status=count ...".
proxied_by_status() {
    metrics | awk -F'[{}",= ]+' -v c="$CLUSTER_ID" '/^tunnel_server_proxied_requests_total\{/ {
        for (i = 2; i < NF; i += 2) l[$i] = $(i + 1); if (l["kind"] == "k8s" && l["target"] == c) printf "%s=%s ", l["status"], $NF }'
}
# audit_lines PATTERN: the server's audit lines whose path matches PATTERN (extended regex).
audit_lines() { server_log | grep -E 'proxied request' | grep -E "path=[^ ]*($1)" || true; }
proto_name() { if [[ "$1" == true ]]; then echo websocket; else echo SPDY; fi; }

# === the pods ===

streams_pods() {
    step "pods for the streaming steps: a shell, an HTTP server with 64 MiB, a ticker (a line every 100 ms), one started with -it for attach"
    cat >"$W/stream-pods.yaml" <<EOF
apiVersion: v1
kind: Pod
metadata: {name: shell, namespace: $NSP}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - {name: shell, image: $BUSYBOX_IMAGE, imagePullPolicy: Never, command: [sh, -c, 'trap "exit 0" TERM; while :; do sleep 1; done']}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: $NSP}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: web
    image: $BUSYBOX_IMAGE
    imagePullPolicy: Never
    command: [sh, -c, 'mkdir -p /www && head -c 67108864 /dev/urandom >/www/blob && head -c 4194304 /www/blob >/www/small && sha256sum /www/blob /www/small >/www/sums && exec httpd -f -p 8080 -h /www']
    ports: [{containerPort: 8080}]
    readinessProbe: {exec: {command: [test, -s, /www/sums]}, periodSeconds: 1}
---
apiVersion: v1
kind: Pod
metadata: {name: ticker, namespace: $NSP}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - {name: ticker, image: $BUSYBOX_IMAGE, imagePullPolicy: Never, command: [sh, -c, 'i=0; while :; do i=\$((i+1)); echo "tick \$i"; usleep 100000; done']}
---
apiVersion: v1
kind: Pod
metadata: {name: att, namespace: $NSP}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - {name: att, image: $BUSYBOX_IMAGE, imagePullPolicy: Never, stdin: true, tty: true, command: [sh]}
EOF
    kc "$SUSER" apply -f "$W/stream-pods.yaml" 2>&1 | indent
    kc "$SUSER" -n "$NSP" wait --for=condition=Ready pod/shell pod/web pod/ticker pod/att --timeout=120s 2>&1 | indent ||
        fail "the streaming pods did not become Ready"
    kc "$SUSER" -n "$NSP" get pods -o wide 2>&1 | indent
    STREAM_METRICS0="$(proxied_by_status)"
    ok "pods Ready"
}

# === point 1: exec -it, both protocols ===

# exec_tty WS: kubectl exec -it sh in tmux, with KUBECTL_REMOTE_COMMAND_WEBSOCKETS=WS.
exec_tty() {
    local ws="$1" s="exec-$1" t0 size
    step "kubectl exec -it in a real terminal (tmux), $(proto_name "$ws") (KUBECTL_REMOTE_COMMAND_WEBSOCKETS=$ws)"
    tmx new-session -d -s "$s" -x 120 -y 30 \
        "$(kc_cmdline "$SUSER" KUBECTL_REMOTE_COMMAND_WEBSOCKETS="$ws") -n $NSP exec -it shell -- sh; echo kubectl-exit=\$?; sleep 300"
    wait_until 20 "a prompt" pane_has "$s" '/ #' || fail "no prompt: $(pane "$s")"
    info "prompt after ${WAITED}s"
    local want
    want="$(pane_size "$s")"
    keys "$s" 'echo answer-$((6*7)); tty; echo size-a; stty size' Enter
    wait_until 10 "the answer" pane_line "$s" answer-42 || fail "no answer: $(pane "$s")"
    wait_until 5 "stty size" pane_line "$s" "$want" || fail "stty size: $(after_line "$s" size-a) (the pane: $want)"
    info "typed 'echo answer-\$((6*7)); tty; stty size' -> answer-42, $(pane "$s" | grep -m1 '^/dev/pts/'), stty size '$(after_line "$s" size-a)' (the pane: $want)"
    tmx resize-window -t "$s" -x 100 -y 25
    want="$(pane_size "$s")"
    t0="$(now)"
    # The new size travels asynchronously (SIGWINCH -> kubectl -> resize channel -> the tty);
    # ask again until it shows.
    size_follows() { keys "$s" 'echo size-b; stty size' Enter; sleep 0.3; [[ "$(after_line "$s" size-b)" == "$want" ]]; }
    wait_until 10 "stty size $want after the resize" size_follows || fail "stty size after the resize: $(after_line "$s" size-b), the pane: $want"
    info "window resized to 100x25: stty size in the pod says '$(after_line "$s" size-b)' (the pane: $want) within $(since "$t0")s"
    keys "$s" 'sleep 30' Enter
    sleep 1
    t0="$(now)"
    keys "$s" C-c
    keys "$s" 'echo after-ctrl-c' Enter
    wait_until 10 "Ctrl-C interrupts sleep 30" pane_line "$s" after-ctrl-c || fail "Ctrl-C did not interrupt sleep: $(pane "$s")"
    local t_int; t_int="$(since "$t0")"
    keys "$s" 'exit 3' Enter
    wait_until 15 "kubectl exits" pane_has "$s" kubectl-exit= || fail "kubectl exec -it did not end: $(pane "$s")"
    pane "$s" | grep -v '^$' | indent
    pane_line "$s" kubectl-exit=3 || fail "kubectl's exit status is not 3: $(pane "$s" | grep kubectl-exit=)"
    tmx kill-session -t "$s"
    ok "$(proto_name "$ws"): prompt, answer-42 on a /dev/pts tty, stty size following the pane (then $want after the resize), Ctrl-C ended sleep 30 in ${t_int}s, exit 3 -> kubectl exit status 3"
}

# exec_stdin_eof WS: echo hi | kubectl exec -i shell -- cat ends when stdin ends.
exec_stdin_eof() {
    local ws="$1" t0 out rc=0
    t0="$(now)"
    out="$(echo hi | timeout 30 bash -c "$(kc_cmdline "$SUSER" KUBECTL_REMOTE_COMMAND_WEBSOCKETS="$ws") -n $NSP exec -i shell -- cat" 2>&1)" || rc=$?
    info "$(proto_name "$ws"): 'echo hi | kubectl exec -i shell -- cat' printed '$out', exit $rc after $(since "$t0")s"
    ((rc != 124)) || fail "$(proto_name "$ws"): exec -i did not end when stdin ended (cut after 30 s)"
    [[ "$out" == hi && $rc == 0 ]] || fail "$(proto_name "$ws"): exec -i printed '$out', exit $rc"
}

streams_exec() {
    exec_tty true
    exec_tty false
    step "echo hi | kubectl exec -i POD -- cat ends, with both protocols (stdin's end reaches cat)"
    exec_stdin_eof true
    exec_stdin_eof false
    ok "exec -i ends with stdin on both protocols: websocket (v5) closes stdin with its CLOSE signal on channel 255; SPDY half-closes the stdin stream (a DATA frame with FIN) inside the one connection, so neither needs a TCP half-close, which the tunnel does not have"
}

# === point 2: attach ===

streams_attach() {
    local s=attach t0
    step "kubectl attach -it to a pod started with stdin and a tty; detach with Ctrl-P Ctrl-Q; attach again"
    tmx new-session -d -s "$s" -x 120 -y 30 "$(kc_cmdline "$SUSER") -n $NSP attach -it att; echo kubectl-exit=\$?; sleep 300"
    wait_until 20 "attached" pane_has "$s" 'If you don' || true
    keys "$s" Enter
    wait_until 10 "a prompt" pane_has "$s" '/ #' || fail "no prompt: $(pane "$s")"
    keys "$s" 'MARK=first-$((3*7)); echo attached-$MARK' Enter
    wait_until 10 "the answer" pane_line "$s" attached-first-21 || fail "no answer: $(pane "$s")"
    t0="$(now)"
    keys "$s" C-p C-q
    wait_until 10 "kubectl detaches" pane_has "$s" kubectl-exit= || fail "Ctrl-P Ctrl-Q did not detach: $(pane "$s")"
    pane "$s" | grep -v '^$' | tail -n 6 | indent
    info "detached in $(since "$t0")s; the pod: $(kc "$SUSER" -n "$NSP" get pod att -o jsonpath='{.status.phase} restarts={.status.containerStatuses[0].restartCount}')"
    tmx kill-session -t "$s"
    [[ "$(kc "$SUSER" -n "$NSP" get pod att -o jsonpath='{.status.phase}/{.status.containerStatuses[0].restartCount}')" == Running/0 ]] ||
        fail "the attached shell did not survive the detach"
    tmx new-session -d -s "$s" -x 120 -y 30 "$(kc_cmdline "$SUSER") -n $NSP attach -it att; echo kubectl-exit=\$?; sleep 300"
    wait_until 20 "attached again" pane_has "$s" 'If you don' || true
    keys "$s" 'echo again-$MARK' Enter
    wait_until 10 "the same shell" pane_line "$s" again-first-21 || fail "not the same shell: $(pane "$s")"
    pane "$s" | grep -v '^$' | tail -n 4 | indent
    keys "$s" C-p C-q
    wait_until 10 "kubectl detaches" pane_has "$s" kubectl-exit= || fail "second detach: $(pane "$s")"
    tmx kill-session -t "$s"
    ok "attach: typed into the pod's own shell, detached with Ctrl-P Ctrl-Q (pod still Running, no restart), attached again to the same shell (its variable still set)"
}

# === point 3: port-forward ===

streams_port_forward() {
    local port sums blob_sum small_sum got line t0 i
    step "kubectl port-forward to a pod port serving 64 MiB: SHA-256, throughput, 20 concurrent connections"
    sums="$(kc "$SUSER" -n "$NSP" exec web -- cat /www/sums)"
    blob_sum="$(awk '$2 == "/www/blob" { print $1 }' <<<"$sums")"
    small_sum="$(awk '$2 == "/www/small" { print $1 }' <<<"$sums")"
    [[ -n "$blob_sum" && -n "$small_sum" ]] || fail "no checksums from the pod: $sums"
    port="$(on_mgmt python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    bg_run portfwd "" "$W/logs/portfwd.log" "${KC_ARGV[@]}" -n "$NSP" port-forward pod/web "$port:8080"
    wait_until 20 "port-forward listening" grep -q "Forwarding from 127.0.0.1:$port" "$W/logs/portfwd.log" ||
        fail "port-forward did not start: $(cat "$W/logs/portfwd.log")"
    info "$(head -n 1 "$W/logs/portfwd.log")"
    line="$(on_mgmt curl -sS --max-time 120 -o "$W/pf.blob" -w '%{http_code} %{size_download} %{time_total}' "http://127.0.0.1:$port/blob")"
    got="$(sha256sum "$W/pf.blob" | cut -d' ' -f1)"
    rm -f "$W/pf.blob"
    read -r code size secs <<<"$line"
    info "GET /blob through the port-forward: HTTP $code, $size bytes in ${secs}s = $(awk -v b="$size" -v s="$secs" 'BEGIN { printf "%.1f MiB/s", b / s / 1048576 }')"
    info "sha256 in the pod $blob_sum, received $got"
    [[ "$code" == 200 && "$size" == 67108864 && "$got" == "$blob_sum" ]] || fail "the 64 MiB did not arrive intact"
    t0="$(now)"
    on_mgmt bash -c "for i in \$(seq 1 20); do curl -sS --max-time 120 -o $W/pf.small.\$i http://127.0.0.1:$port/small & done; wait"
    local t_all; t_all="$(since "$t0")"
    local bad=0
    for i in $(seq 1 20); do
        [[ "$(sha256sum "$W/pf.small.$i" 2>/dev/null | cut -d' ' -f1)" == "$small_sum" ]] || bad=$((bad + 1))
        rm -f "$W/pf.small.$i"
    done
    info "20 concurrent GET /small (4 MiB each) through the one port-forward: ${t_all}s, $(awk -v s="$t_all" 'BEGIN { printf "%.1f MiB/s", 80 / s }') together, $bad with a wrong checksum"
    ((bad == 0)) || fail "$bad of 20 concurrent downloads were corrupt or missing"
    alive portfwd || fail "port-forward ended"
    stop_bg portfwd TERM 5
    ok "port-forward: 64 MiB intact at $(awk -v b="$size" -v s="$secs" 'BEGIN { printf "%.1f MiB/s", b / s / 1048576 }'), 20 concurrent connections intact in ${t_all}s"
}

# === point 4: cp ===

streams_cp() {
    local sum inside back t0 t_in t_out
    step "kubectl cp of a 32 MiB file into the pod and back"
    head -c 33554432 /dev/urandom >"$W/cp32"
    sum="$(sha256sum "$W/cp32" | cut -d' ' -f1)"
    t0="$(now)"
    kc "$SUSER" cp "$W/cp32" "$NSP/shell:/tmp/cp32" 2>&1 | indent
    t_in="$(since "$t0")"
    inside="$(kc "$SUSER" -n "$NSP" exec shell -- sha256sum /tmp/cp32 | cut -d' ' -f1)"
    t0="$(now)"
    kc "$SUSER" cp "$NSP/shell:/tmp/cp32" "$W/cp32.back" 2>&1 | grep -v 'Removing leading' | indent
    t_out="$(since "$t0")"
    back="$(sha256sum "$W/cp32.back" 2>/dev/null | cut -d' ' -f1)"
    rm -f "$W/cp32" "$W/cp32.back"
    info "sha256 local $sum"
    info "       in the pod $inside (cp in: ${t_in}s)"
    info "       copied back $back (cp out: ${t_out}s)"
    [[ "$sum" == "$inside" && "$sum" == "$back" ]] || fail "kubectl cp changed the bytes"
    ok "kubectl cp 32 MiB in (${t_in}s) and out (${t_out}s), checksums equal"
}

# === point 5: logs -f ===

streams_logs() {
    local base during t0 kcq
    step "kubectl logs -f of a pod writing a line every 100 ms: arrival delay, gaps; killing kubectl closes the tunnel stream"
    # The follow is a plain GET: it may take a pooled upstream connection (its stream already
    # counted in the baseline) or dial a fresh one (+1). Either way, once kubectl dies the
    # server drops the unfinished response and that connection's tunnel stream closes.
    base="$(server_streams)"
    kcq="$(printf '%q ' "${KC_ARGV[@]}")"
    : >"$W/logsf.out"
    bg_run logsf "" "$W/logs/logsf.log" bash -c "$kcq -n $NSP logs -f --timestamps --tail 1 ticker | while IFS= read -r l; do printf '%s %s\n' \"\$(date +%s.%N)\" \"\$l\"; done >>$W/logsf.out"
    wait_until 15 "the first followed line" test -s "$W/logsf.out" || fail "kubectl logs -f printed nothing: $(cat "$W/logs/logsf.log")"
    sleep 6
    during="$(server_streams)"
    alive logsf || fail "kubectl logs -f ended by itself"
    t0="$(now)"
    stop_bg logsf KILL 2
    wait_until 15 "the follow's tunnel stream closed" eval '(($(server_streams) < during && $(server_streams) <= base))' ||
        fail "a tunnel stream stayed open after kubectl was killed: $(server_streams) open, $during while following, baseline $base"
    local t_closed; t_closed="$(since "$t0")"
    python3 - "$W/logsf.out" >"$W/logsf.report" <<'PY'
import sys, datetime
rows = []
for line in open(sys.argv[1]):
    parts = line.split()
    if len(parts) < 4 or parts[2] != "tick":
        continue
    arrived = float(parts[0])
    stamp = parts[1].rstrip("Z")
    whole, _, frac = stamp.partition(".")
    written = datetime.datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.timezone.utc).timestamp()
    written += float("0." + (frac or "0"))
    rows.append((arrived, written))
rows = rows[1:]  # the --tail 1 line was written before kubectl started
delays = sorted(a - w for a, w in rows)
gaps = [b[0] - a[0] for a, b in zip(rows, rows[1:])]
p = lambda q: delays[min(len(delays) - 1, int(q * len(delays)))]
print(f"{len(rows)} {p(0.5):.3f} {p(0.99):.3f} {max(delays):.3f} {max(gaps):.3f}")
PY
    local n p50 p99 mx gap
    read -r n p50 p99 mx gap <"$W/logsf.report"
    info "$n lines followed in ~6 s; written -> printed by kubectl: p50 ${p50}s, p99 ${p99}s, max ${mx}s; largest gap between lines ${gap}s"
    tail -n 3 "$W/logsf.out" | indent
    info "tunnel streams open on the server: $base before, $during while following, $(server_streams) ${t_closed}s after kubectl was killed"
    ((n >= 30)) || fail "only $n lines in 6 s (the pod writes 10 a second)"
    fcmp "$mx" '<' 0.5 || fail "a line took ${mx}s to arrive (goal: within 500 ms)"
    ok "logs -f: every line within ${mx}s (goal 0.5 s), largest gap ${gap}s; the tunnel stream closed ${t_closed}s after kubectl died"
}

# === point 6: run --rm -it, debug ===

streams_run_debug() {
    local s=run
    step "kubectl run --rm -it (a new pod, attached, removed on exit)"
    tmx new-session -d -s "$s" -x 120 -y 30 \
        "$(kc_cmdline "$SUSER") -n $NSP run rr --rm -it --restart=Never --image=$BUSYBOX_IMAGE --image-pull-policy=Never -- sh; echo kubectl-exit=\$?; sleep 300"
    wait_until 60 "attached" pane_has "$s" 'If you don' || true
    keys "$s" Enter
    wait_until 10 "a prompt" pane_has "$s" '/ #' || fail "no prompt: $(pane "$s")"
    keys "$s" 'echo in-run-$((40+2)); hostname' Enter
    wait_until 10 "the answer" pane_line "$s" in-run-42 || fail "no answer: $(pane "$s")"
    keys "$s" 'exit' Enter
    wait_until 60 "kubectl exits" pane_has "$s" kubectl-exit= || fail "kubectl run did not end: $(pane "$s")"
    pane "$s" | grep -v '^$' | indent
    pane_line "$s" kubectl-exit=0 || fail "kubectl run exit status: $(pane "$s" | grep kubectl-exit=)"
    tmx kill-session -t "$s"
    gone() { ! kc "$SUSER" -n "$NSP" get pod rr >/dev/null 2>&1; }
    wait_until 30 "pod rr deleted" gone || fail "pod rr still there"
    ok "run --rm -it: prompt, answer, exit 0, the pod deleted"

    s=debug
    step "kubectl debug -it: an ephemeral container in the running pod, attached"
    tmx new-session -d -s "$s" -x 120 -y 30 \
        "$(kc_cmdline "$SUSER") -n $NSP debug -it shell --image=$BUSYBOX_IMAGE --image-pull-policy=Never --container=dbg -- sh; echo kubectl-exit=\$?; sleep 300"
    wait_until 60 "attached" pane_has "$s" 'If you don' || true
    keys "$s" Enter
    wait_until 10 "a prompt" pane_has "$s" '/ #' || fail "no prompt: $(pane "$s")"
    keys "$s" 'echo debug-$((2+3)); hostname; ps' Enter
    wait_until 10 "the answer" pane_line "$s" debug-5 || fail "no answer: $(pane "$s")"
    keys "$s" 'exit' Enter
    wait_until 30 "kubectl exits" pane_has "$s" kubectl-exit= || fail "kubectl debug did not end: $(pane "$s")"
    pane "$s" | grep -v '^$' | indent
    tmx kill-session -t "$s"
    info "pod shell: ephemeral containers $(kc "$SUSER" -n "$NSP" get pod shell -o jsonpath='{range .status.ephemeralContainerStatuses[*]}{.name}: {.state}{end}')"
    [[ "$(kc "$SUSER" -n "$NSP" get pod shell -o jsonpath='{.spec.ephemeralContainers[*].name}')" == *dbg* ]] || fail "no ephemeral container dbg"
    ok "debug -it: ephemeral container dbg in pod shell, attached, exited"
}

# === point 8: RBAC ===

streams_rbac() {
    local token out rc
    step "a user whose downstream RBAC lacks pods/exec: get pods works, exec is Forbidden (impersonation applies to upgrades too)"
    ts user add viewer >"$W/user-viewer.out"
    token="$(sed -n 's/^API token (shown once): //p' "$W/user-viewer.out")"
    [[ -n "$token" ]] || fail "no API token for viewer"
    ts grant viewer "$CLUSTER_NAME" | indent
    ts kubeconfig "$CLUSTER_NAME" --user viewer >"$W/viewer.kubeconfig"
    chmod 600 "$W/viewer.kubeconfig"
    kd -n "$NSP" create role pod-viewer --verb=get,list,watch --resource=pods,pods/log 2>&1 | indent
    kd -n "$NSP" create rolebinding viewer-pods --role=pod-viewer --user=viewer 2>&1 | indent
    kc viewer -n "$NSP" get pods 2>&1 | indent
    kc viewer -n "$NSP" get pods >/dev/null 2>&1 || fail "viewer cannot get pods"
    local ws
    for ws in true false; do
        rc=0
        out="$(timeout 30 bash -c "$(kc_cmdline viewer KUBECTL_REMOTE_COMMAND_WEBSOCKETS="$ws") -n $NSP exec shell -c shell -- true" 2>&1 </dev/null)" || rc=$?
        info "$(proto_name "$ws"): kubectl exec as viewer -> exit $rc: $out"
        [[ $rc != 0 && "$out" == *Forbidden* || $rc != 0 && "$out" == *forbidden* ]] || fail "viewer's exec was not Forbidden"
        [[ "$out" == *'"viewer"'* ]] || fail "the refusal does not name the impersonated user viewer"
    done
    rc=0
    out="$(timeout 30 bash -c "$(kc_cmdline viewer) -n $NSP port-forward pod/web 0:8080" 2>&1 </dev/null)" || rc=$?
    info "port-forward as viewer -> exit $rc: $(head -c 200 <<<"$out")"
    [[ $rc != 0 && $rc != 124 ]] || fail "viewer's port-forward was not refused"
    ok "viewer: get pods works; exec (both protocols) and port-forward refused by the downstream apiserver as User \"viewer\""
}

# === point 7: audit and metrics ===

streams_audit() {
    local what pattern n
    step "an audit line for each request (user, cluster, verb, path, status, bytes, duration) and the counters in /metrics"
    for what in "exec:/shell/exec" "attach:/att/attach" "port-forward:/web/portforward" "logs -f:/ticker/log" "debug:/shell/ephemeralcontainers"; do
        pattern="${what#*:}"
        n="$(audit_lines "$pattern" | wc -l)"
        info "${what%%:*}: $n audit lines, e.g.:"
        audit_lines "$pattern" | grep -m1 "user=$SUSER" | sed -E 's/^.*(proxied request)/\1/' | cut -c1-300 | indent
        ((n > 0)) || fail "no audit line for ${what%%:*}"
        audit_lines "$pattern" | grep -m1 "user=$SUSER" | grep -E "target_id=$CLUSTER_ID .*verb=[A-Z]+ .*status=[0-9]+ .*bytes_in=[0-9]+ .*bytes_out=[0-9]+ .*duration_ms=[0-9]+" >/dev/null ||
            fail "the ${what%%:*} audit line lacks a field"
    done
    local spdy wsk
    spdy="$(audit_lines '/exec' | grep -cE 'upgrade="?SPDY/3.1')"
    wsk="$(audit_lines '/exec' | grep -cE 'upgrade="?websocket')"
    info "exec requests by the protocol their audit line names: SPDY/3.1 $spdy, websocket $wsk"
    ((spdy > 0 && wsk > 0)) ||
        fail "the audit lines do not show both exec protocols"
    info "viewer's refused exec: $(audit_lines '/exec' | grep 'user=viewer' | grep -oE 'status=[0-9]+' | sort | uniq -c | tr -s ' ' | tr '\n' ' ')"
    info "tunnel_server_proxied_requests_total for $CLUSTER_ID by status, before the streaming steps: $STREAM_METRICS0"
    info "                                                                  after: $(proxied_by_status)"
    local before after
    before="$(tr ' ' '\n' <<<"$STREAM_METRICS0" | awk -F= '$1 == 101 { print $2 }')"
    after="$(proxied_by_status | tr ' ' '\n' | awk -F= '$1 == 101 { print $2 }')"
    (("${after:-0}" - "${before:-0}" >= 10)) || fail "the upgraded requests are not counted (101: ${before:-0} -> ${after:-0})"
    ok "audit lines for exec, attach, port-forward, logs and debug; $((${after:-0} - ${before:-0})) upgrades (101) counted"
}

pods_streaming() {
    streams_pods
    streams_exec
    streams_attach
    streams_port_forward
    streams_cp
    streams_logs
    streams_run_debug
    streams_rbac
    streams_audit
}

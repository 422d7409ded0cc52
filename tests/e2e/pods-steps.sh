# shellcheck shell=bash
# shellcheck disable=SC2034,SC2317  # variables are the interface with the sourcing suite; helpers are called indirectly (wait_until)
# The agents as pods (issue 14, points 2, 4, 5): steps shared by tests/e2e/pods.sh (the
# two-node cluster of lib/cluster.sh behind the NAT) and tests/kind/run.sh (a kind cluster).
# Sourced after suite-lib.sh (step/info/ok/fail/warn/wait_until/now/since/fcmp/indent/bg_run/stop_bg).
#
# The suite provides these, and nothing here knows where the cluster runs:
#   kd ARGS...              the downstream cluster's own admin kubectl
#   kc USER ARGS...         kubectl with USER's kubeconfig from `tunnel-server kubeconfig`
#   KC_ARGV=(...)           the same for user $SUSER as a plain command (background loops)
#   api PATH                the server's /v1 API as an admin (curl, prints the body)
#   ts ARGS...              the tunnel-server admin CLI
#   downstream_sh SCRIPT    runs SCRIPT (bash) on the downstream control-plane host as its
#                           operator: kubectl (cluster admin) and curl on PATH, the server's CA
#                           in $DOWN_CA
#   dk_argv NODE_ID         sets DK_ARGV=(...): the docker CLI through the server for that node
#   images_tag FROM TO      tags image FROM as TO in every node's runtime
#   kubelet_stop NODE / kubelet_start NODE   (NODE: a Kubernetes node name)
# and these variables: W (work dir, with pids/ and logs/), CLUSTER_ID, IMPORT_URL, SUSER,
# AGENT_TAG (the tag the server renders), NODES (Kubernetes node names), WORKER (one of them),
# BUSYBOX_IMAGE.
#
# NODE_AGENTS=0 (default 1): the suite runs no node agents (tests/kind: kind nodes run containerd
# and have no Docker socket for them): pods_import applies the manifest without ?nodeAgent=true
# and waits for neither the DaemonSet nor the nodes, fault_rolling_update leaves the node agent's
# image and DaemonSet alone, fault_kubelet shows no docker column, and the suite does not call
# fault_delete_node_agent (nor needs dk_argv). With the default nothing changes.

CS=cattle-system

# node_agents: true unless the suite set NODE_AGENTS=0.
node_agents() { [[ "${NODE_AGENTS:-1}" != 0 ]]; }
# nodes_expected: how many nodes the server should list connected (0 without node agents).
nodes_expected() { if node_agents; then echo "${#NODES[@]}"; else echo 0; fi; }

# === probes run in the background ===

# probe_loop OUT STOPFILE INTERVAL TIMEOUT CMD...: runs CMD (bounded by TIMEOUT s) every INTERVAL
# s until STOPFILE exists; one line per call: "<start epoch> <seconds> <exit code> <output>".
probe_loop() {
    local out="$1" stop="$2" iv="$3" to="$4" t0 t1 msg rc; shift 4
    while [[ ! -e "$stop" ]]; do
        t0="$(date +%s.%N)"
        rc=0; msg="$(timeout "$to" "$@" 2>&1)" || rc=$?
        t1="$(date +%s.%N)"
        printf '%s %s %s %s\n' "$t0" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')" "$rc" \
            "$(printf '%s' "$msg" | tr '\n' ' ' | cut -c1-150)" >>"$out"
        sleep "$iv"
    done
}
# probe_start NAME INTERVAL TIMEOUT CMD...: probe_loop in the background, output $W/NAME.probe.
probe_start() {
    local name="$1" iv="$2" to="$3"; shift 3
    rm -f "$W/$name.stop"; : >"$W/$name.probe"
    bg_run "$name" "" "$W/logs/$name.log" bash -c "$(declare -f probe_loop); probe_loop \"\$@\"" probe \
        "$W/$name.probe" "$W/$name.stop" "$iv" "$to" "$@"
}
probe_stop() {   # lets the call in flight finish (each is bounded), then stops the loop
    touch "$W/$1.stop"
    local deadline=$((SECONDS + 15))
    while alive "$1" && ((SECONDS < deadline)); do sleep 0.1; done
    stop_bg "$1" TERM 2
}
# probe_ok_streak NAME N: the last N calls succeeded.
probe_ok_streak() {
    local n="$2"
    (($(wc -l <"$W/$1.probe") >= n)) || return 1
    [[ -z "$(tail -n "$n" "$W/$1.probe" | awk '$3 != 0')" ]]
}
# probe_report NAME T0: the calls grouped into runs of the same result, times relative to T0;
# then a line with the count, the failures, the slowest call and the calls cut by the timeout.
probe_report() {
    awk -v t0="$2" '
        function flush() { if (n) printf "        +%6.2fs .. +%6.2fs  %3d x %-72s (slowest %.3fs)\n", a - t0, b - t0, n, key, mx }
        {
            msg = ""; for (i = 4; i <= NF; i++) msg = msg (i > 4 ? " " : "") $i
            if ($3 == 0) k = "ok: " substr(msg, 1, 66); else if ($3 == 124) k = "TIMEOUT (hung)"; else k = "exit " $3 ": " substr(msg, 1, 64)
            if (k != key) { flush(); key = k; n = 0; mx = 0; a = $1 }
            n++; b = $1; if ($2 > mx) mx = $2
        }
        END { flush() }' "$W/$1.probe"
    awk '{ n++; if ($3 != 0) f++; if ($3 == 124) h++; if ($2 > m) m = $2 }
        END { printf "        %d calls, %d failed, %d cut by the timeout; slowest %.3fs\n", n, f, h, m }' "$W/$1.probe"
}
probe_hangs() { awk '$3 == 124 { h++ } END { print h + 0 }' "$W/$1.probe"; }
probe_max() { awk '$2 > m { m = $2 } END { printf "%.3f", m }' "$W/$1.probe"; }

# The cluster's state on the server, every 150 ms:
# "<epoch> <connected> <tunnel> <connectedMessage, spaces as _> <nodes connected>".
state_sample() {
    local c n
    c="$(api "/v1/clusters/$CLUSTER_ID" | jq -r '"\(.connected) \(.tunnel) \((.connectedMessage // "-") | gsub(" "; "_"))"' 2>/dev/null)" || c="? ? -"
    n="$(api "/v1/nodes?cluster=$CLUSTER_ID" | jq -r '[(.items // .)[] | select(.connected)] | length' 2>/dev/null)" || n="?"
    printf '%s %s %s\n' "$(date +%s.%N)" "${c:-? ? -}" "${n:-?}"
}
state_start() {
    rm -f "$W/state.stop"; : >"$W/state.samples"
    bg_run state "" "$W/logs/state.log" bash -c "$(declare -p W CLUSTER_ID SERVER_URL NS_MGMT ADMIN_TOKEN 2>/dev/null); $(declare -f api sc inm state_sample 2>/dev/null);
        while [[ ! -e $W/state.stop ]]; do state_sample >>$W/state.samples; sleep 0.15; done"
}
state_stop() { touch "$W/state.stop"; sleep 0.5; stop_bg state TERM 2; }
# state_report T0 NODES_EXPECTED: the periods in which the cluster was not Connected, or had fewer
# nodes connected; prints the totals into NOT_CONNECTED / NODES_DOWN (seconds).
state_report() {
    local t0="$1" want="$2"
    awk -v t0="$t0" -v want="$want" '
        { n++ }
        { c = ($2 == "true"); if (c != pc || n == 1) { if (n > 1) { m = $4; gsub("_", " ", m); printf "        +%6.2fs  cluster %s\n", $1 - t0, c ? "Connected again" : "NOT Connected (connected=" $2 ", tunnel=" $3 ", connectedMessage: " m ")" }; pc = c }
          if (!c) { if (!inc) { cs = $1; inc = 1 } } else if (inc) { nc += $1 - cs; inc = 0 }
          d = ($5 != want); if (d != pd) { if (n > 1 || d) printf "        +%6.2fs  nodes connected: %s of %s\n", $1 - t0, $5, want; pd = d }
          if (d) { if (!ind) { ds = $1; ind = 1 } } else if (ind) { nd += $1 - ds; ind = 0 }
          last = $1 }
        END { if (inc) nc += last - cs; if (ind) nd += last - ds
              printf "        %d samples over %.1fs: cluster not Connected for %.2fs in total, fewer than %d nodes connected for %.2fs\n", n, last - t0, nc, want, nd
              printf "%.2f %.2f\n", nc, nd > "/dev/stderr" }' "$W/state.samples" 2>"$W/state.totals"
    read -r NOT_CONNECTED NODES_DOWN <"$W/state.totals"
}

# dials_snapshot: the server's dial counters, "result=count ..." (tunnel_server_dials_total).
dials_snapshot() { metrics | awk -F'[{}"= ]+' '/^tunnel_server_dials_total\{/ { printf "%s=%s ", $3, $4 }'; }
# dials_delta BEFORE AFTER: what changed between two snapshots.
dials_delta() {
    awk -v a="$1" -v b="$2" 'BEGIN { n = split(a, x, " "); for (i = 1; i <= n; i++) { split(x[i], kv, "="); o[kv[1]] = kv[2] }
        n = split(b, y, " "); for (i = 1; i <= n; i++) { split(y[i], kv, "="); d = kv[2] - o[kv[1]]; if (d) printf "%s +%d  ", kv[1], d } }'
}

# === point 2: the import, as an operator runs it ===

pods_import() {
    local na_q="?nodeAgent=true" na_note="the DaemonSet comes with ?nodeAgent=true"
    node_agents || { na_q=""; na_note="NODE_AGENTS=0: no DaemonSet"; }
    step "import as an operator: on the downstream control-plane host, curl <import URL>$na_q | kubectl apply -f -"
    IMPORT_CMD="curl --cacert \"\$DOWN_CA\" -sfL '$IMPORT_URL$na_q' | kubectl apply -f -"
    info "the command 'cluster add' printed: kubectl apply -f $IMPORT_URL"
    info "run: $IMPORT_CMD   ($na_note; the CA is the server's /cacerts)"
    T_IMPORT="$(now)"
    downstream_sh "$IMPORT_CMD" 2>&1 | indent
    ok "applied in $(since "$T_IMPORT")s"

    if node_agents; then
        step "kubectl rollout status: Deployment $CS/cattle-cluster-agent, DaemonSet $CS/cattle-node-agent"
    else
        step "kubectl rollout status: Deployment $CS/cattle-cluster-agent (NODE_AGENTS=0: no DaemonSet)"
    fi
    local t0
    t0="$(now)"
    kd -n "$CS" rollout status deployment/cattle-cluster-agent --timeout=180s 2>&1 | indent ||
        fail "the cluster agent's Deployment did not roll out"
    T_ROLLOUT_DEPLOY="$(since "$T_IMPORT")"
    if node_agents; then
        kd -n "$CS" rollout status daemonset/cattle-node-agent --timeout=180s 2>&1 | indent ||
            fail "the node agent's DaemonSet did not roll out"
        T_ROLLOUT_DS="$(since "$T_IMPORT")"
        info "rollout: Deployment available ${T_ROLLOUT_DEPLOY}s after the apply, DaemonSet ${T_ROLLOUT_DS}s (status calls took $(since "$t0")s)"
    else
        info "rollout: Deployment available ${T_ROLLOUT_DEPLOY}s after the apply (status call took $(since "$t0")s)"
    fi
    kd -n "$CS" get deployment,daemonset,pods -o wide 2>&1 | indent
    local replicas
    replicas="$(kd -n "$CS" get deployment cattle-cluster-agent -o jsonpath='{.spec.replicas}')"
    info "the manifest sets no replicas: the Deployment runs $replicas (Rancher's own controller would scale it to min(2, nodes) from the annotation scale-available; this server does not)"
    # What the pods were given: only the manifest's settings.
    kd -n "$CS" get pods -l app=cattle-cluster-agent -o json | jq -r '.items[0] | "cluster agent pod \(.metadata.name) on \(.spec.nodeName) ip \(.status.podIP), image \(.spec.containers[0].image), env: \([.spec.containers[0].env[].name] | join(","))"' | indent
    kd -n "$CS" get pods -l app=cattle-agent -o json | jq -r '.items[] | "node agent pod \(.metadata.name) on \(.spec.nodeName) (hostNetwork \(.spec.hostNetwork)), image \(.spec.containers[0].image)"' | indent

    if node_agents; then
        step "the server lists the cluster Connected and both nodes connected (/v1/clusters, /v1/nodes, CLI)"
    else
        step "the server lists the cluster Connected (/v1/clusters, CLI; NODE_AGENTS=0: no nodes)"
    fi
    probe_connected() { api "/v1/clusters/$CLUSTER_ID" | jq -e '.connected == true and .tunnel == true and .aggregationTunnel == true'; }
    wait_until 60 "cluster Connected" probe_connected || fail "cluster not Connected: $(api "/v1/clusters/$CLUSTER_ID")"
    info "Connected ${WAITED}s after the rollout status returned ($(since "$T_IMPORT")s after the apply)"
    nodes_connected() { [[ "$(api "/v1/nodes?cluster=$CLUSTER_ID" | jq '[(.items // .)[] | select(.connected)] | length')" == "${#NODES[@]}" ]]; }
    if node_agents; then
        wait_until 60 "${#NODES[@]} nodes connected" nodes_connected || fail "nodes: $(api "/v1/nodes?cluster=$CLUSTER_ID")"
    fi
    T_CONNECTED="$(since "$T_IMPORT")"
    api "/v1/clusters/$CLUSTER_ID" | jq -c '{id, name, apiEndpoint, tunnel, aggregationTunnel, connected}' | indent
    api "/v1/nodes?cluster=$CLUSTER_ID" | jq -c '(.items // .)[] | {id, hostname, connected, docker: .params.dockerInfo.ServerVersion}' | indent
    ts cluster list | indent
    NODE_IDS=()
    if ! node_agents; then
        ok "cluster $CLUSTER_ID Connected; ${T_CONNECTED}s from the apply"
        return 0
    fi
    local n id
    for n in "${NODES[@]}"; do
        id="$(api "/v1/nodes?cluster=$CLUSTER_ID" | jq -r --arg h "$n" '(.items // .)[] | select(.hostname == $h) | .id')"
        [[ -n "$id" ]] || fail "no node with hostname $n on the server"
        NODE_IDS+=("$id")
    done
    ok "cluster $CLUSTER_ID Connected, nodes ${NODE_IDS[*]} connected; ${T_CONNECTED}s from the apply"
}

# === point 4: the cluster through the server ===

pods_workload() {
    step "kubectl get nodes through the server: both Ready"
    kc "$SUSER" get nodes -o wide 2>&1 | indent
    local ready
    ready="$(kc "$SUSER" get nodes -o json | jq '[.items[] | select(any(.status.conditions[]; .type == "Ready" and .status == "True"))] | length')"
    [[ "$ready" == "${#NODES[@]}" ]] || fail "$ready of ${#NODES[@]} nodes Ready"
    ok "${#NODES[@]} nodes Ready, seen with the kubeconfig the server handed out"

    step "a Deployment of $BUSYBOX_IMAGE scaled 1 -> 3 -> 1, kubectl get pods -w through the server"
    kc "$SUSER" create namespace pods-e2e 2>&1 | indent
    cat >"$W/bb.yaml" <<EOF
apiVersion: apps/v1
kind: Deployment
metadata: {name: bb, namespace: pods-e2e}
spec:
  replicas: 1
  selector: {matchLabels: {app: bb}}
  template:
    metadata: {labels: {app: bb}}
    spec:
      terminationGracePeriodSeconds: 2
      containers:
      - name: bb
        image: $BUSYBOX_IMAGE
        imagePullPolicy: Never
        command: [sh, -c, 'echo "bb up on \$NODE"; trap "exit 0" TERM; while :; do sleep 1; done']
        env: [{name: NODE, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}]
EOF
    : >"$W/podwatch.out"
    local kcq
    kcq="$(printf '%q ' "${KC_ARGV[@]}")"
    bg_run podwatch "" "$W/logs/podwatch.log" bash -c "$kcq -n pods-e2e get pods -w --output-watch-events -o 'jsonpath={.type} {.object.metadata.name} {.object.status.phase} {.object.spec.nodeName} {.object.metadata.deletionTimestamp}{\"\\n\"}' | while IFS= read -r l; do printf '%s %s\n' \"\$(date +%s.%N)\" \"\$l\"; done >>$W/podwatch.out"
    sleep 2
    alive podwatch || fail "kubectl get pods -w exited: $(cat "$W/logs/podwatch.log")"
    local T_W0
    T_W0="$(now)"
    kc "$SUSER" apply -f "$W/bb.yaml" 2>&1 | indent
    avail() { [[ "$(kc "$SUSER" -n pods-e2e get deployment bb -o jsonpath='{.status.availableReplicas}/{.status.replicas}')" == "$1/$1" ]]; }
    wait_until 90 "1 pod available" avail 1 || fail "the Deployment did not become available"
    info "1 replica available after ${WAITED}s"
    T_SCALE3="$(since "$T_W0")"
    kc "$SUSER" -n pods-e2e scale deployment bb --replicas=3 2>&1 | indent
    wait_until 90 "3 pods available" avail 3 || fail "3 replicas not available"
    info "scaled to 3: available after ${WAITED}s"
    kc "$SUSER" -n pods-e2e get pods -o wide 2>&1 | indent
    T_SCALE1="$(since "$T_W0")"
    kc "$SUSER" -n pods-e2e scale deployment bb --replicas=1 2>&1 | indent
    only_one() { [[ "$(kc "$SUSER" -n pods-e2e get pods --no-headers 2>/dev/null | wc -l)" == 1 ]]; }
    wait_until 90 "back to 1 pod" only_one || fail "pods did not go away"
    info "scaled to 1: the other two gone after ${WAITED}s"
    sleep 1
    alive podwatch || fail "the watch ended"
    stop_bg podwatch TERM 5
    info "what kubectl get pods -w printed, by pod (seconds since the apply; scale to 3 at +${T_SCALE3}s, to 1 at +${T_SCALE1}s):"
    awk -v t0="$T_W0" '
        { p = $3; if (!(p in first)) { first[p] = $1 - t0; order[++n] = p }
          if ($4 == "Running" && !(p in run)) run[p] = $1 - t0
          if ($6 != "" && !(p in term)) term[p] = $1 - t0
          if ($2 == "DELETED") del[p] = $1 - t0
          node[p] = $5; ev[p]++ }
        END { for (i = 1; i <= n; i++) { p = order[i]
                printf "        %-24s on %-12s first seen %+7.2fs, Running %s, terminating %s, DELETED %s (%d events)\n", p, node[p], first[p],
                  (p in run) ? sprintf("%+7.2fs", run[p]) : "   -   ", (p in term) ? sprintf("%+7.2fs", term[p]) : "   -   ", (p in del) ? sprintf("%+7.2fs", del[p]) : "   -   ", ev[p] } }' "$W/podwatch.out"
    local added deleted
    added="$(awk '$2 == "ADDED"' "$W/podwatch.out" | awk '{print $3}' | sort -u | wc -l)"
    deleted="$(awk '$2 == "DELETED"' "$W/podwatch.out" | wc -l)"
    info "the watch saw $added pods added and $deleted deleted"
    ((added >= 3 && deleted >= 2)) || fail "the watch did not see the pods come and go (added $added, deleted $deleted)"
    ok "kubectl get pods -w through the server saw the pods come and go"

    step "kubectl describe and get events through the server"
    kc "$SUSER" -n pods-e2e describe deployment bb 2>&1 | sed -n '1,12p;/^Events:/,$p' | indent
    local pod
    pod="$(kc "$SUSER" -n pods-e2e get pods -o jsonpath='{.items[0].metadata.name}')"
    kc "$SUSER" -n pods-e2e describe pod "$pod" 2>&1 | grep -E '^(Name|Node|Status|IP):|^Events:|^  (Normal|Warning)' | indent
    kc "$SUSER" -n pods-e2e get events --sort-by=.lastTimestamp 2>&1 | tail -n 14 | indent
    local nev
    nev="$(kc "$SUSER" -n pods-e2e get events --no-headers 2>/dev/null | wc -l)"
    ((nev > 0)) || fail "no events"
    info "kubectl logs $pod: $(kc "$SUSER" -n pods-e2e logs "$pod" 2>&1 | sed -n 1p)"
    ok "describe, $nev events, logs"
}

# === point 5: faults ===

kube_probe_start() {
    probe_start kprobe 0.5 10 "${KC_ARGV[@]}" --request-timeout=8s get ns default -o name
    # An upgrade (exec) never reuses a pooled upstream connection: each one is a fresh dial
    # through the tunnel the server picks at that moment.
    probe_start xprobe 1 15 "${KC_ARGV[@]}" --request-timeout=12s -n pods-e2e exec deploy/bb -- echo exec-ok
}
kube_probe_stop() { probe_stop kprobe; probe_stop xprobe; }
kube_probe_report() {
    info "kubectl get ns default through the server, every 0.5 s (each bounded by 10 s; seconds since the fault):"
    probe_report kprobe "$1"
    info "kubectl exec deploy/bb -- echo through the server, every 1 s (a fresh dial each; bounded by 15 s):"
    probe_report xprobe "$1"
}
# ca_pods: the cluster agent's pods, oldest first: "name phase ready node".
ca_pods() {
    kd -n "$CS" get pods -l app=cattle-cluster-agent --sort-by=.metadata.creationTimestamp -o json |
        jq -r '.items[] | "\(.metadata.name) \(if .metadata.deletionTimestamp then "Terminating" else .status.phase end) \(any(.status.conditions[]?; .type == "Ready" and .status == "True")) \(.spec.nodeName)"'
}
# deploy_settled N: N cluster agent pods, all Running and Ready, none terminating.
deploy_settled() {
    local l; l="$(ca_pods)"
    [[ "$(grep -c . <<<"$l")" == "$1" && -z "$(awk '$2 != "Running" || $3 != "true"' <<<"$l")" ]]
}

# fault_delete_cluster_agent: deletes the pod the server dials now (the newest), a kubectl loop
# through the server meanwhile.
fault_delete_cluster_agent() {
    local replicas victim t0
    replicas="$(kd -n "$CS" get deployment cattle-cluster-agent -o jsonpath='{.spec.replicas}')"
    step "fault: the cluster agent's pod deleted ($replicas replica(s)); kubectl get ns default in a loop through the server"
    ca_pods | indent
    victim="$(ca_pods | awk 'END { print $1 }')"
    kube_probe_start; state_start
    sleep 2
    local d0; d0="$(dials_snapshot)"
    t0="$(now)"
    kd -n "$CS" delete pod "$victim" --wait=false 2>&1 | indent
    info "deleted $victim (the newest: the server dials the newest session)"
    wait_until 120 "a replacement Ready, $replicas pod(s) settled" deploy_settled "$replicas" || fail "the Deployment did not replace the pod: $(ca_pods)"
    local t_settled; t_settled="$(since "$t0")"
    wait_until 30 "3 kubectl calls in a row succeed" probe_ok_streak kprobe 3 || true
    sleep 1
    kube_probe_stop; state_stop
    info "replacement Ready and the old pod gone ${t_settled}s after the delete:"
    ca_pods | indent
    kube_probe_report "$t0"
    info "the server's view:"
    state_report "$t0" "$(nodes_expected)"
    info "the server's dials through tunnels meanwhile (pooled = an idle upstream connection reused): $(dials_delta "$d0" "$(dials_snapshot)")"
    local h; h="$(($(probe_hangs kprobe) + $(probe_hangs xprobe)))"
    ((h == 0)) || fail "$h kubectl call(s) hung until their timeout"
    fcmp "$(probe_max kprobe)" '<' 9 || fail "a kubectl call took $(probe_max kprobe)s"
    probe_ok_streak kprobe 3 || fail "kubectl does not work again after the replacement"
    ok "pod deleted with $replicas replica(s): not Connected ${NOT_CONNECTED}s, slowest kubectl $(probe_max kprobe)s, no hang"
}

fault_scale_two() {
    step "the cluster agent's Deployment scaled to 2, as Rancher's controller does from the annotation scale-available: \"2\""
    local t0; t0="$(now)"
    kd -n "$CS" scale deployment cattle-cluster-agent --replicas=2 2>&1 | indent
    kd -n "$CS" rollout status deployment/cattle-cluster-agent --timeout=120s 2>&1 | indent || fail "2 replicas not available"
    wait_until 60 "2 pods settled" deploy_settled 2 || fail "pods: $(ca_pods)"
    ca_pods | indent
    ok "2 replicas Ready in $(since "$t0")s (pods on: $(ca_pods | awk '{print $4}' | sort | uniq -c | awk '{printf "%s x%s ", $2, $1}'))"
}

# fault_rolling_update TAG: the import manifest applied again with the agents' images at TAG.
fault_rolling_update() {
    local tag="$1" replicas t0 img imgs=(cattle-cluster-agent) na_q=""
    if node_agents; then imgs+=(cattle-node-agent); na_q="?nodeAgent=true"; fi
    replicas="$(kd -n "$CS" get deployment cattle-cluster-agent -o jsonpath='{.spec.replicas}')"
    step "fault: the import manifest re-applied with agent image tag :$tag (rolling update, $replicas replica(s)); /v1/clusters polled every 150 ms"
    for img in "${imgs[@]}"; do images_tag "$AGENT_REPO/$img:$AGENT_TAG" "$AGENT_REPO/$img:$tag"; done
    info "same binaries, new tag :$tag on every node (what the server renders stays :$AGENT_TAG; the fetched manifest's image lines are changed)"
    kube_probe_start; state_start
    sleep 2
    local d0; d0="$(dials_snapshot)"
    t0="$(now)"
    downstream_sh "curl --cacert \"\$DOWN_CA\" -sfL '$IMPORT_URL$na_q' | sed 's#\\(image: \"$AGENT_REPO/cattle-[a-z-]*-agent\\):[^\"]*\"#\\1:$tag\"#' | kubectl apply -f -" 2>&1 |
        grep -vE ' unchanged$' | indent
    kd -n "$CS" rollout status deployment/cattle-cluster-agent --timeout=180s 2>&1 | tail -n 1 | indent || fail "the Deployment's rollout did not finish"
    local t_dep; t_dep="$(since "$t0")"
    local t_ds=""
    if node_agents; then
        kd -n "$CS" rollout status daemonset/cattle-node-agent --timeout=180s 2>&1 | tail -n 1 | indent || fail "the DaemonSet's rollout did not finish"
        t_ds=", DaemonSet $(since "$t0")s"
    fi
    wait_until 60 "old pods gone" deploy_settled "$replicas" || fail "pods: $(ca_pods)"
    local t_settled; t_settled="$(since "$t0")"
    sleep 3
    kube_probe_stop; state_stop
    info "Deployment rolled out ${t_dep}s after the apply${t_ds}; old cluster agent pods gone after ${t_settled}s"
    kd -n "$CS" get pods -o wide 2>&1 | indent
    if kd -n "$CS" get pods -o jsonpath='{range .items[*]}{.spec.containers[0].image}{"\n"}{end}' | grep -qv ":$tag\$"; then
        fail "pods not all on :$tag"
    fi
    info "the server's view (seconds since the apply):"
    state_report "$t0" "$(nodes_expected)"
    kube_probe_report "$t0"
    info "the server's dials through tunnels meanwhile: $(dials_delta "$d0" "$(dials_snapshot)")"
    (($(probe_hangs kprobe) + $(probe_hangs xprobe) == 0)) || fail "kubectl hung"
    if fcmp "$NOT_CONNECTED" '<=' 0; then
        ok "rolling update to :$tag with $replicas replica(s): the cluster never stopped being Connected"
    else
        ok "rolling update to :$tag with $replicas replica(s): the cluster was NOT Connected for ${NOT_CONNECTED}s in total (goal: never)"
    fi
}

# fault_delete_node_agent NODE: the node agent's pod on NODE deleted; docker through the server for
# that node in a loop.
fault_delete_node_agent() {
    local node="$1" id="$2" pod t0
    step "fault: the node agent's pod on $node deleted; docker version through the server for node $id in a loop"
    pod="$(kd -n "$CS" get pods -l app=cattle-agent --field-selector "spec.nodeName=$node" -o jsonpath='{.items[0].metadata.name}')"
    [[ -n "$pod" ]] || fail "no node agent pod on $node"
    dk_argv "$id"
    probe_start dprobe 0.5 10 "${DK_ARGV[@]}" version --format '{{.Server.Version}} {{.Server.Os}}'
    wait_until 10 "docker works" probe_ok_streak dprobe 1 || fail "docker through the server does not work before the fault: $(tail -n 1 "$W/dprobe.probe")"
    local d0; d0="$(dials_snapshot)"
    t0="$(now)"
    kd -n "$CS" delete pod "$pod" --wait=false 2>&1 | indent
    na_ready() {
        local l; l="$(kd -n "$CS" get pods -l app=cattle-agent --field-selector "spec.nodeName=$node" -o json |
            jq -r '.items[] | "\(.metadata.name) \(.metadata.deletionTimestamp != null) \(any(.status.conditions[]?; .type == "Ready" and .status == "True"))"')"
        [[ "$(grep -c . <<<"$l")" == 1 && "$l" != "$pod "* && "$l" == *" false true" ]]
    }
    wait_until 90 "a new node agent pod Ready on $node" na_ready || fail "no new node agent on $node"
    local t_ready; t_ready="$(since "$t0")"
    wait_until 30 "docker works 3 times in a row" probe_ok_streak dprobe 3 || true
    probe_stop dprobe
    T_NA_READY="$t_ready"
    info "new pod $(kd -n "$CS" get pods -l app=cattle-agent --field-selector "spec.nodeName=$node" -o jsonpath='{.items[0].metadata.name}') Ready ${t_ready}s after the delete"
    info "docker version through the server for $node, every 0.5 s (seconds since the delete):"
    probe_report dprobe "$t0"
    info "the server's dials through tunnels meanwhile: $(dials_delta "$d0" "$(dials_snapshot)")"
    local old_gone
    old_gone="$(kd get events -n "$CS" --field-selector "involvedObject.name=$pod" -o json | jq -r '[.items[] | "\(.reason)"] | join(",")')"
    info "events of the old pod $pod: $old_gone"
    local first_ok
    first_ok="$(awk -v t0="$t0" 'BEGIN { f = 0 } $1 > t0 && $3 != 0 { f = 1 } f && $3 == 0 { printf "%.2f", $1 - t0; exit }' "$W/dprobe.probe")"
    (($(probe_hangs dprobe) == 0)) || fail "docker hung"
    probe_ok_streak dprobe 3 || fail "docker does not work again for $node"
    T_DOCKER_BACK="${first_ok:-0}"
    ok "node agent on $node replaced in ${t_ready}s; docker through the server $(if [[ -n "$first_ok" ]]; then echo "back at +${first_ok}s"; else echo "never failed"; fi)"
}

# fault_kubelet NODE ID SECONDS: the node's kubelet stopped for SECONDS, then started.
fault_kubelet() {
    local node="$1" id="$2" secs="$3" t0 t line st
    step "fault: the kubelet of $node stopped for ${secs}s, then started; what kubectl through the server showed"
    t0="$(now)"
    kubelet_stop "$node" 2>&1 | indent
    if node_agents; then dk_argv "$id"; fi
    T_NOTREADY=""
    while fcmp "$(since "$t0")" '<' "$secs"; do
        t="$(since "$t0")"
        line="$(kc "$SUSER" get node "$node" --no-headers --request-timeout=5s 2>&1 | awk '{print $1, $2}' || true)"
        st="$(awk '{print $2}' <<<"$line")"
        [[ -n "$T_NOTREADY" || "$st" != NotReady* ]] || T_NOTREADY="$t"
        printf '        +%5.1fs  kubectl get node: %-28s  pods on it: %s' "$t" "$line" \
            "$(kc "$SUSER" get pods -A --field-selector "spec.nodeName=$node" --no-headers --request-timeout=5s 2>/dev/null | awk '{print $4}' | sort | uniq -c | awk '{printf "%s %s ", $1, $2}')"
        if node_agents; then
            printf '  docker ps through the server: %s containers' "$(timeout 10 "${DK_ARGV[@]}" ps -q 2>/dev/null | wc -l)"
        fi
        printf '\n'
        sleep 5
    done
    kc "$SUSER" describe node "$node" 2>/dev/null | sed -n '/^Conditions:/,/^Addresses:/p' | indent
    local t_start; t_start="$(now)"
    kubelet_start "$node" 2>&1 | indent
    node_ready() { kc "$SUSER" get node "$node" --no-headers --request-timeout=5s | awk '{exit !($2 == "Ready")}'; }
    wait_until 120 "$node Ready again" node_ready || fail "$node not Ready again"
    info "after the start: Ready ${WAITED}s later (kubelet restarted ${secs}s after the stop)"
    kc "$SUSER" get nodes 2>&1 | indent
    info "NotReady first seen through the server at +${T_NOTREADY:-never (within ${secs}s)}s; Ready again $(since "$t_start")s after the kubelet started"
    [[ -n "$T_NOTREADY" ]] || warn "the node never showed NotReady within ${secs}s (node-monitor-grace-period)"
    api "/v1/clusters/$CLUSTER_ID" | jq -c '{connected}' | indent
    ok "kubelet fault: NotReady at +${T_NOTREADY:-?}s, Ready again $(since "$t_start")s after the start"
}

#!/usr/bin/env bash
# The main job on one machine: the management server with its embedded SQLite store, and a
# node agent that dials in to it, registers and shows up as connected. Everything stays on
# loopback; state lives in a temp dir that is removed on exit. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
port="${DEMO_PORT:-8443}"
url="https://127.0.0.1:$port"
dir="$(mktemp -d /tmp/tunnel-demo.XXXXXX)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT INT TERM

echo "== building tunnel-server and cattle-node-agent (release)"
cargo build --release -q -p server-side -p agent-node
bin=target/release

echo "== tunnel-server serve on $url (state: $dir/server)"
"$bin/tunnel-server" --data-dir "$dir/server" serve --listen "127.0.0.1:$port" --server-url "$url" \
  >"$dir/server.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do curl -fsS --cacert "$dir/server/ca.pem" "$url/ping" >/dev/null 2>&1 && break; sleep 0.2; done
curl -fsS --cacert "$dir/server/ca.pem" "$url/ping"; echo "  <- $url/ping"

admin=$("$bin/tunnel-server" --data-dir "$dir/server" user add admin --admin | grep -Eo 'token-[a-z0-9]+:[A-Za-z0-9]+' | head -n1)
import=$("$bin/tunnel-server" --data-dir "$dir/server" cluster add demo)
echo "$import"
token=$(grep -Eo '/v3/import/[a-z0-9]+_' <<<"$import" | sed 's|/v3/import/||; s|_$||')
checksum=$(curl -fsS --cacert "$dir/server/ca.pem" "$url/v3/settings/cacerts" | jq -r .value | sha256sum | cut -d' ' -f1)

echo "== cattle-node-agent dials out (CATTLE_CA_CHECKSUM=$checksum)"
"$bin/cattle-node-agent" --server "$url" --token "$token" --ca-checksum "$checksum" \
  --node-name demo-node --state-dir "$dir/agent" --health-addr 127.0.0.1:0 \
  >"$dir/agent.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do
  nodes=$(curl -fsS --cacert "$dir/server/ca.pem" -H "Authorization: Bearer $admin" "$url/v1/nodes" 2>/dev/null || true)
  grep -Eq '"connected": ?true' <<<"$nodes" && break
  sleep 0.2
done
echo "== GET $url/v1/nodes"
echo "$nodes"
grep -Eq '"connected": ?true' <<<"$nodes" || { echo "the agent did not connect; agent log:"; tail -20 "$dir/agent.log"; exit 1; }
echo "== the agent is connected; logs in $dir. Ctrl-C to stop."
[ -n "${DEMO_ONESHOT:-}" ] || wait

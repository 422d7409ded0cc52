// A pod's shell and its live logs, both through the server's Kubernetes proxy on the session
// (the router turns the cookie into the user's bearer, so the same grants and impersonation
// apply as for kubectl). Namespaces, pods and containers come from the cluster's own API.
//
// The shell is Kubernetes' exec websocket: v5.channel.k8s.io (v4 as a fallback), each
// message one channel byte then data: 0 stdin, 1 stdout, 2 stderr, 3 the final status (JSON),
// 4 a resize {"Width","Height"}. A browser websocket cannot set X-CSRF-Token, so the token
// goes as one more offered subprotocol, which the server checks and strips (session.rs).
import { useEffect, useRef, useState } from "preact/hooks";
import { Terminal } from "@xterm/xterm";
import { FitAddon } from "@xterm/addon-fit";
import "@xterm/xterm/css/xterm.css";
import { call, csrf } from "./api";

interface Named {
  metadata: { name: string };
}
interface Pod extends Named {
  spec: { containers: { name: string }[] };
  status?: { phase?: string };
}

const STDIN = 0;
const STDOUT = 1;
const STDERR = 2;
const ERROR = 3;
const RESIZE = 4;
// Lines of a followed log kept on the page; older ones are dropped.
const MAX_LOG_LINES = 2000;

function useList<T>(path: string | null): [T[], string] {
  const [items, setItems] = useState<T[]>([]);
  const [error, setError] = useState("");
  useEffect(() => {
    setItems([]);
    setError("");
    if (!path) return;
    let live = true;
    call<{ items: T[] }>("GET", path)
      .then((r) => live && setItems(r.items))
      .catch((e) => live && setError(String((e as Error).message)));
    return () => {
      live = false;
    };
  }, [path]);
  return [items, error];
}

function Select({ id, label, value, options, onChange }: { id: string; label: string; value: string; options: string[]; onChange: (v: string) => void }) {
  return (
    <>
      <label for={id}>{label}</label>
      <select id={id} value={value} onChange={(e) => onChange((e.target as HTMLSelectElement).value)}>
        <option value="">—</option>
        {options.map((o) => (
          <option key={o} value={o}>
            {o}
          </option>
        ))}
      </select>
    </>
  );
}

export function PodShellPage({ id }: { id: string }) {
  const base = `/k8s/clusters/${id}/api/v1`;
  const [ns, setNs] = useState("");
  const [pod, setPod] = useState("");
  const [container, setContainer] = useState("");
  const [mode, setMode] = useState<"" | "shell" | "logs">("");
  const [namespaces, nsError] = useList<Named>(`${base}/namespaces`);
  const [pods, podsError] = useList<Pod>(ns ? `${base}/namespaces/${encodeURIComponent(ns)}/pods` : null);
  const containers = pods.find((p) => p.metadata.name === pod)?.spec.containers.map((c) => c.name) ?? [];
  useEffect(() => {
    if (containers.length && !containers.includes(container)) setContainer(containers[0]);
  }, [pod, pods]);
  const target = ns && pod && container ? `${base}/namespaces/${encodeURIComponent(ns)}/pods/${encodeURIComponent(pod)}` : "";
  return (
    <section aria-labelledby="shell-h">
      <h1 id="shell-h">
        Pods of <a href={`#/clusters/${id}`}>{id}</a>
      </h1>
      {(nsError || podsError) && (
        <p role="alert" class="error">
          {nsError || podsError}
        </p>
      )}
      <form class="inline" onSubmit={(e) => e.preventDefault()}>
        <Select id="ns" label="Namespace" value={ns} options={namespaces.map((n) => n.metadata.name)} onChange={(v) => { setNs(v); setPod(""); setMode(""); }} />
        <Select id="pod" label="Pod" value={pod} options={pods.map((p) => p.metadata.name)} onChange={(v) => { setPod(v); setMode(""); }} />
        <Select id="container" label="Container" value={container} options={containers} onChange={(v) => { setContainer(v); setMode(""); }} />
        <button type="button" disabled={!target} onClick={() => setMode("shell")}>
          Open a shell
        </button>
        <button type="button" disabled={!target} onClick={() => setMode("logs")}>
          Follow logs
        </button>
      </form>
      {mode === "shell" && target && <Shell key={`${target}/${container}`} path={target} container={container} />}
      {mode === "logs" && target && <Logs key={`${target}/${container}`} path={target} container={container} />}
    </section>
  );
}

function Shell({ path, container }: { path: string; container: string }) {
  const box = useRef<HTMLDivElement>(null);
  const [state, setState] = useState("connecting");
  useEffect(() => {
    const term = new Terminal({ convertEol: false, cursorBlink: true, screenReaderMode: true });
    const fit = new FitAddon();
    term.loadAddon(fit);
    term.open(box.current!);
    fit.fit();
    const q = new URLSearchParams({ container, stdin: "true", stdout: "true", stderr: "true", tty: "true" });
    for (const c of ["/bin/sh", "-c", "command -v bash >/dev/null && exec bash || exec sh"]) q.append("command", c);
    const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}${path}/exec?${q}`;
    const ws = new WebSocket(url, ["v5.channel.k8s.io", "v4.channel.k8s.io", `csrf.tunnel-server.${csrf()}`]);
    ws.binaryType = "arraybuffer";
    const enc = new TextEncoder();
    const send = (channel: number, data: Uint8Array) => {
      if (ws.readyState !== WebSocket.OPEN) return;
      const msg = new Uint8Array(data.length + 1);
      msg[0] = channel;
      msg.set(data, 1);
      ws.send(msg);
    };
    const resize = () => send(RESIZE, enc.encode(JSON.stringify({ Width: term.cols, Height: term.rows })));
    ws.onopen = () => {
      setState(`connected (${ws.protocol})`);
      resize();
      term.focus();
    };
    ws.onmessage = (ev) => {
      const data = new Uint8Array(ev.data as ArrayBuffer);
      if (data.length === 0) return;
      const body = data.subarray(1);
      if (data[0] === STDOUT || data[0] === STDERR) term.write(body);
      else if (data[0] === ERROR) {
        try {
          const status = JSON.parse(new TextDecoder().decode(body));
          if (status.status !== "Success") setState(`ended: ${status.message ?? status.reason}`);
        } catch {
          setState("ended");
        }
      }
    };
    ws.onerror = () => setState("connection error");
    ws.onclose = (ev) => setState((s) => (s.startsWith("ended") ? s : `closed (${ev.code})`));
    const input = term.onData((d) => send(STDIN, enc.encode(d)));
    const onResize = term.onResize(resize);
    const observer = new ResizeObserver(() => fit.fit());
    observer.observe(box.current!);
    return () => {
      observer.disconnect();
      input.dispose();
      onResize.dispose();
      ws.close();
      term.dispose();
    };
  }, [path, container]);
  return (
    <div class="terminal-wrap">
      <p role="status" id="shell-state">
        Shell: {state}
      </p>
      <div ref={box} class="terminal" role="region" aria-label={`Shell in ${container}`} />
    </div>
  );
}

function Logs({ path, container }: { path: string; container: string }) {
  const [lines, setLines] = useState<string[]>([]);
  const [state, setState] = useState("following");
  useEffect(() => {
    const abort = new AbortController();
    (async () => {
      const q = new URLSearchParams({ container, follow: "true", tailLines: "200" });
      const resp = await fetch(`${path}/log?${q}`, { credentials: "same-origin", signal: abort.signal });
      if (!resp.ok || !resp.body) {
        setState(`error: ${resp.status} ${await resp.text()}`);
        return;
      }
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let partial = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        const parts = (partial + value).split("\n");
        partial = parts.pop() ?? "";
        if (parts.length) setLines((old) => [...old, ...parts].slice(-MAX_LOG_LINES));
      }
      setState("ended");
    })().catch((e) => {
      if (!abort.signal.aborted) setState(`error: ${(e as Error).message}`);
    });
    return () => abort.abort();
  }, [path, container]);
  return (
    <div>
      <p role="status">Logs: {state}</p>
      <pre class="logs" tabIndex={0} aria-label={`Logs of ${container}`} aria-live="off">
        {lines.join("\n")}
      </pre>
    </div>
  );
}

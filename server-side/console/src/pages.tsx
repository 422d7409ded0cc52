// The console's pages. Each reads the REST API and, where state is live, re-reads it when the
// server's event stream (/console/events) says a cluster changed: no polling, no reload.
import { useCallback, useEffect, useState } from "preact/hooks";
import {
  call,
  type ApiToken,
  type Cluster,
  type Grant,
  type ImportInfo,
  type Node,
  type User,
} from "./api";

export interface Live {
  /** Bumped on every event: pages that show live state depend on it. */
  version: number;
  connected: boolean;
}

export function useLiveFeed(): Live {
  const [live, setLive] = useState<Live>({ version: 0, connected: false });
  useEffect(() => {
    const source = new EventSource("/console/events", { withCredentials: true });
    const bump = () => setLive((l) => ({ version: l.version + 1, connected: true }));
    source.addEventListener("cluster", bump);
    source.addEventListener("resync", bump);
    source.onopen = () => setLive((l) => ({ ...l, connected: true }));
    // The browser reconnects by itself (the server asks for 2 s); the stream's first event
    // on reconnecting is a resync.
    source.onerror = () => setLive((l) => ({ ...l, connected: false }));
    return () => source.close();
  }, []);
  return live;
}

function when(unix?: number | null): string {
  if (!unix) return "—";
  return new Date(unix * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

function bytes(n: number): string {
  if (n < 1024) return `${n} B`;
  if (n < 1 << 20) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / (1 << 20)).toFixed(1)} MiB`;
}

function useLoad<T>(load: () => Promise<T>, deps: unknown[]): [T | undefined, string, () => void] {
  const [data, setData] = useState<T | undefined>(undefined);
  const [error, setError] = useState("");
  const [nonce, setNonce] = useState(0);
  useEffect(() => {
    let alive = true;
    load()
      .then((d) => {
        if (alive) {
          setData(d);
          setError("");
        }
      })
      .catch((e) => alive && setError(String(e.message)));
    return () => {
      alive = false;
    };
  }, [...deps, nonce]);
  return [data, error, useCallback(() => setNonce((n) => n + 1), [])];
}

function Status({ error, message }: { error?: string; message?: string }) {
  return (
    <div class="status" role="status" aria-live="polite">
      {error ? <p class="error">{error}</p> : message ? <p>{message}</p> : null}
    </div>
  );
}

function Connected({ on, message }: { on: boolean; message?: string | null }) {
  return (
    <span class={`state ${on ? "ok" : "down"}`} title={message ?? undefined}>
      {on ? "Connected" : "Disconnected"}
    </span>
  );
}

function CopyButton({ text, label }: { text: string; label: string }) {
  const [done, setDone] = useState("");
  const copy = async () => {
    try {
      await navigator.clipboard.writeText(text);
      setDone("Copied.");
    } catch {
      setDone("Copying was refused by the browser: select the text and copy it.");
    }
  };
  return (
    <>
      <button type="button" onClick={copy} aria-label={label}>
        Copy
      </button>
      <span role="status" aria-live="polite" class="hint">
        {done}
      </span>
    </>
  );
}

export function ClustersPage({ user, live }: { user: User; live: Live }) {
  const [clusters, error] = useLoad(
    () => call<{ items: Cluster[] }>("GET", "/v1/clusters").then((r) => r.items),
    [live.version],
  );
  return (
    <section aria-labelledby="clusters-h">
      <h1 id="clusters-h">Clusters</h1>
      <Status error={error} />
      {clusters && clusters.length === 0 && (
        <p>{user.admin ? "No clusters yet: add one." : "No cluster is granted to you."}</p>
      )}
      {clusters && clusters.length > 0 && (
        <table class="clusters">
          <caption class="sr-only">Clusters and their connection state, updated live</caption>
          <thead>
            <tr>
              <th scope="col">Name</th>
              <th scope="col" class="wide">Id</th>
              <th scope="col">State</th>
              <th scope="col" class="wide">Agent tunnel</th>
              <th scope="col" class="wide">Streams</th>
              <th scope="col" class="wide">Bytes in / out</th>
              <th scope="col" class="wide">Last probe</th>
            </tr>
          </thead>
          <tbody>
            {clusters.map((c) => (
              <tr key={c.id} data-cluster={c.name}>
                <th scope="row">
                  <a href={`#/clusters/${c.id}`}>{c.name}</a>
                </th>
                <td class="wide">
                  <code>{c.id}</code>
                </td>
                <td class="connected">
                  <Connected on={c.connected} message={c.connectedMessage} />
                </td>
                <td class="wide">{c.tunnel ? "up" : "down"}</td>
                <td class="wide">{c.streams}</td>
                <td class="wide">
                  {bytes(c.bytesIn)} / {bytes(c.bytesOut)}
                </td>
                <td class="wide">{when(c.checkedAt)}</td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
    </section>
  );
}

export function AddClusterPage() {
  const [name, setName] = useState("");
  const [created, setCreated] = useState<{ cluster: Cluster; importCommand: string } | null>(null);
  const [error, setError] = useState("");
  const submit = async (e: Event) => {
    e.preventDefault();
    setError("");
    try {
      setCreated(await call("POST", "/v1/clusters", { name }));
    } catch (err) {
      setError(String((err as Error).message));
    }
  };
  return (
    <section aria-labelledby="add-h">
      <h1 id="add-h">Add a cluster</h1>
      <form onSubmit={submit} class="inline">
        <label for="cluster-name">Cluster name</label>
        <input
          id="cluster-name"
          required
          pattern="[A-Za-z0-9._@\-]{1,63}"
          value={name}
          onInput={(e) => setName((e.target as HTMLInputElement).value)}
        />
        <button type="submit">Create</button>
      </form>
      <Status error={error} />
      {created && (
        <div class="import" aria-labelledby="import-h">
          <h2 id="import-h">
            Import <a href={`#/clusters/${created.cluster.id}`}>{created.cluster.name}</a> ({created.cluster.id})
          </h2>
          <p>Run this in the cluster to install its agent:</p>
          <pre>
            <code id="import-command">{created.importCommand}</code>
          </pre>
          <CopyButton text={created.importCommand} label="Copy the import command" />
        </div>
      )}
    </section>
  );
}

export function ClusterPage({ id, user, live }: { id: string; user: User; live: Live }) {
  const [cluster, error] = useLoad(() => call<Cluster>("GET", `/v1/clusters/${id}`), [id, live.version]);
  const [nodes, nodesError] = useLoad(
    () => call<{ items: Node[] }>("GET", `/v1/nodes?cluster=${id}`).then((r) => r.items),
    [id, live.version],
  );
  return (
    <section aria-labelledby="cluster-h">
      <h1 id="cluster-h">Cluster {cluster?.name ?? id}</h1>
      <Status error={error || nodesError} />
      {cluster && (
        <dl class="facts">
          <dt>Id</dt>
          <dd>
            <code>{cluster.id}</code>
          </dd>
          <dt>State</dt>
          <dd>
            <Connected on={cluster.connected} message={cluster.connectedMessage} />
            {cluster.connectedMessage && <span class="hint"> {cluster.connectedMessage}</span>}
          </dd>
          <dt>Tunnel owner</dt>
          <dd>{cluster.presence?.replica ?? "—"}</dd>
          <dt>Last seen</dt>
          <dd>{when(cluster.presence?.lastSeen)}</dd>
          <dt>API endpoint</dt>
          <dd>{cluster.apiEndpoint ?? "—"}</dd>
          <dt>Created</dt>
          <dd>{when(cluster.createdAt)}</dd>
        </dl>
      )}
      <p>
        <a href={`#/clusters/${id}/pods`}>Pods: shells and logs</a>
      </p>
      <h2>Nodes</h2>
      {nodes && nodes.length === 0 && <p>No node agent has registered.</p>}
      {nodes && nodes.length > 0 && (
        <table>
          <thead>
            <tr>
              <th scope="col">Host name</th>
              <th scope="col">Reference</th>
              <th scope="col">State</th>
              <th scope="col">Docker socket</th>
            </tr>
          </thead>
          <tbody>
            {nodes.map((n) => (
              <tr key={n.ref}>
                <th scope="row">{n.hostname}</th>
                <td>
                  <code>{n.ref}</code>
                </td>
                <td>
                  <Connected on={n.connected} />
                </td>
                <td>
                  <code>{n.dockerSocket}</code>
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
      {user.admin && <RegistrationTokens id={id} />}
    </section>
  );
}

function RegistrationTokens({ id }: { id: string }) {
  const [tokens, error, reload] = useLoad(
    () => call<{ items: ImportInfo[] }>("GET", `/v1/clusters/${id}/tokens`).then((r) => r.items),
    [id],
  );
  const [message, setMessage] = useState("");
  const [actionError, setActionError] = useState("");
  const act = async (what: () => Promise<unknown>, done: string) => {
    setActionError("");
    try {
      await what();
      setMessage(done);
      reload();
    } catch (e) {
      setActionError(String((e as Error).message));
    }
  };
  return (
    <section aria-labelledby="tokens-h">
      <h2 id="tokens-h">Registration tokens</h2>
      <p class="hint">Rotate: add a token, re-import with its command, then revoke the old one.</p>
      <button type="button" onClick={() => act(() => call("POST", `/v1/clusters/${id}/tokens`), "Token added.")}>
        Add a token
      </button>
      <Status error={error || actionError} message={message} />
      {tokens && (
        <ul class="tokens">
          {tokens.map((t, i) => (
            <li key={t.registrationToken}>
              <code>{t.importCommand}</code>
              <CopyButton text={t.importCommand} label={`Copy import command ${i + 1}`} />
              <button
                type="button"
                class="danger"
                aria-label={`Revoke registration token ${i + 1}`}
                onClick={() =>
                  act(
                    () => call("DELETE", `/v1/clusters/${id}/tokens/${encodeURIComponent(t.registrationToken)}`),
                    "Token revoked.",
                  )
                }
              >
                Revoke
              </button>
            </li>
          ))}
        </ul>
      )}
    </section>
  );
}

export function UsersPage() {
  const [users, usersError, reloadUsers] = useLoad(
    () => call<{ items: User[] }>("GET", "/v1/users").then((r) => r.items),
    [],
  );
  const [tokens, tokensError, reloadTokens] = useLoad(
    () => call<{ items: ApiToken[] }>("GET", "/v1/tokens").then((r) => r.items),
    [],
  );
  const [grants, grantsError, reloadGrants] = useLoad(
    () => call<{ items: Grant[] }>("GET", "/v1/grants").then((r) => r.items),
    [],
  );
  const [clusters] = useLoad(() => call<{ items: Cluster[] }>("GET", "/v1/clusters").then((r) => r.items), []);
  const [newUser, setNewUser] = useState({ name: "", admin: false });
  const [grant, setGrant] = useState({ userId: "", clusterId: "" });
  const [tokenFor, setTokenFor] = useState({ userId: "", description: "" });
  const [secret, setSecret] = useState<{ who: string; value: string } | null>(null);
  const [message, setMessage] = useState("");
  const [error, setError] = useState("");
  const names = new Map((users ?? []).map((u) => [u.id, u.name]));
  const clusterNames = new Map((clusters ?? []).map((c) => [c.id, c.name]));
  const act = async (what: () => Promise<unknown>, done: string, reload: () => void) => {
    setError("");
    try {
      await what();
      setMessage(done);
      reload();
    } catch (e) {
      setError(String((e as Error).message));
    }
  };
  return (
    <section aria-labelledby="users-h">
      <h1 id="users-h">Users and tokens</h1>
      <Status error={error || usersError || tokensError || grantsError} message={message} />
      {secret && (
        <div class="secret" role="region" aria-label="New API token">
          <p>
            API token for {secret.who} (shown once): <code id="new-token">{secret.value}</code>
          </p>
          <CopyButton text={secret.value} label="Copy the new API token" />
        </div>
      )}
      <h2>Users</h2>
      <form
        class="inline"
        onSubmit={(e) => {
          e.preventDefault();
          act(
            async () => {
              const r = await call<{ user: User; value: string }>("POST", "/v1/users", newUser);
              setSecret({ who: r.user.name, value: r.value });
            },
            `User ${newUser.name} created.`,
            () => {
              reloadUsers();
              reloadTokens();
            },
          );
        }}
      >
        <label for="user-name">User name</label>
        <input
          id="user-name"
          required
          value={newUser.name}
          onInput={(e) => setNewUser({ ...newUser, name: (e.target as HTMLInputElement).value })}
        />
        <label class="check">
          <input
            type="checkbox"
            checked={newUser.admin}
            onChange={(e) => setNewUser({ ...newUser, admin: (e.target as HTMLInputElement).checked })}
          />
          Admin
        </label>
        <button type="submit">Create user</button>
      </form>
      <table>
        <thead>
          <tr>
            <th scope="col">Name</th>
            <th scope="col">Id</th>
            <th scope="col">Admin</th>
            <th scope="col">Created</th>
            <th scope="col">
              <span class="sr-only">Actions</span>
            </th>
          </tr>
        </thead>
        <tbody>
          {(users ?? []).map((u) => (
            <tr key={u.id}>
              <th scope="row">{u.name}</th>
              <td>
                <code>{u.id}</code>
              </td>
              <td>{u.admin ? "yes" : "no"}</td>
              <td>{when((u as User & { createdAt?: number }).createdAt)}</td>
              <td>
                <button
                  type="button"
                  class="danger"
                  aria-label={`Delete user ${u.name}`}
                  onClick={() => act(() => call("DELETE", `/v1/users/${u.id}`), `User ${u.name} deleted.`, reloadUsers)}
                >
                  Delete
                </button>
              </td>
            </tr>
          ))}
        </tbody>
      </table>

      <h2>API tokens</h2>
      <form
        class="inline"
        onSubmit={(e) => {
          e.preventDefault();
          act(
            async () => {
              const r = await call<{ value: string }>("POST", "/v1/tokens", tokenFor);
              setSecret({ who: names.get(tokenFor.userId) ?? tokenFor.userId, value: r.value });
            },
            "API token created.",
            reloadTokens,
          );
        }}
      >
        <label for="token-user">User</label>
        <select
          id="token-user"
          required
          value={tokenFor.userId}
          onChange={(e) => setTokenFor({ ...tokenFor, userId: (e.target as HTMLSelectElement).value })}
        >
          <option value="">Choose…</option>
          {(users ?? []).map((u) => (
            <option value={u.id}>{u.name}</option>
          ))}
        </select>
        <label for="token-desc">Description</label>
        <input
          id="token-desc"
          value={tokenFor.description}
          onInput={(e) => setTokenFor({ ...tokenFor, description: (e.target as HTMLInputElement).value })}
        />
        <button type="submit">Create token</button>
      </form>
      <table>
        <thead>
          <tr>
            <th scope="col">Id</th>
            <th scope="col">User</th>
            <th scope="col">Description</th>
            <th scope="col">State</th>
            <th scope="col">Last used</th>
            <th scope="col">
              <span class="sr-only">Actions</span>
            </th>
          </tr>
        </thead>
        <tbody>
          {(tokens ?? []).map((t) => (
            <tr key={t.id}>
              <th scope="row">
                <code>{t.id}</code>
              </th>
              <td>{names.get(t.userId) ?? t.userId}</td>
              <td>{t.description}</td>
              <td>{t.revoked ? "revoked" : t.expiresAt ? `expires ${when(t.expiresAt)}` : "active"}</td>
              <td>{when(t.lastUsedAt)}</td>
              <td>
                {!t.revoked && (
                  <button
                    type="button"
                    class="danger"
                    aria-label={`Revoke API token ${t.id}`}
                    onClick={() => act(() => call("DELETE", `/v1/tokens/${t.id}`), `Token ${t.id} revoked.`, reloadTokens)}
                  >
                    Revoke
                  </button>
                )}
              </td>
            </tr>
          ))}
        </tbody>
      </table>

      <h2>Grants</h2>
      <form
        class="inline"
        onSubmit={(e) => {
          e.preventDefault();
          act(() => call("POST", "/v1/grants", grant), "Grant added.", reloadGrants);
        }}
      >
        <label for="grant-user">User</label>
        <select
          id="grant-user"
          required
          value={grant.userId}
          onChange={(e) => setGrant({ ...grant, userId: (e.target as HTMLSelectElement).value })}
        >
          <option value="">Choose…</option>
          {(users ?? []).map((u) => (
            <option value={u.id}>{u.name}</option>
          ))}
        </select>
        <label for="grant-cluster">Cluster</label>
        <select
          id="grant-cluster"
          required
          value={grant.clusterId}
          onChange={(e) => setGrant({ ...grant, clusterId: (e.target as HTMLSelectElement).value })}
        >
          <option value="">Choose…</option>
          {(clusters ?? []).map((c) => (
            <option value={c.id}>{c.name}</option>
          ))}
        </select>
        <button type="submit">Grant</button>
      </form>
      <table>
        <thead>
          <tr>
            <th scope="col">User</th>
            <th scope="col">Cluster</th>
            <th scope="col">Since</th>
            <th scope="col">
              <span class="sr-only">Actions</span>
            </th>
          </tr>
        </thead>
        <tbody>
          {(grants ?? []).map((g) => (
            <tr key={`${g.userId}/${g.clusterId}`}>
              <th scope="row">{names.get(g.userId) ?? g.userId}</th>
              <td>{clusterNames.get(g.clusterId) ?? g.clusterId}</td>
              <td>{when(g.createdAt)}</td>
              <td>
                <button
                  type="button"
                  class="danger"
                  aria-label={`Revoke the grant of ${names.get(g.userId) ?? g.userId} on ${clusterNames.get(g.clusterId) ?? g.clusterId}`}
                  onClick={() => act(() => call("DELETE", `/v1/grants/${g.userId}/${g.clusterId}`), "Grant revoked.", reloadGrants)}
                >
                  Revoke
                </button>
              </td>
            </tr>
          ))}
        </tbody>
      </table>
    </section>
  );
}

// The console's only way to the server: the same REST API (/v1), Kubernetes proxy (/k8s) and
// Docker proxy (/docker) the CLI uses, authenticated by the session cookie (HttpOnly: this
// script never sees it or the API token). Mutations carry the CSRF token from sign-in.

export interface User {
  id: string;
  name: string;
  admin: boolean;
  groups: string[];
}

export interface Cluster {
  id: string;
  name: string;
  createdAt: number;
  apiEndpoint?: string | null;
  tunnel: boolean;
  aggregationTunnel: boolean;
  connected: boolean;
  connectedMessage?: string | null;
  checkedAt?: number | null;
  streams: number;
  bytesIn: number;
  bytesOut: number;
  presence?: { connected: boolean; replica: string; lastSeen: number; since?: number } | null;
}

export interface ImportInfo {
  clusterId: string;
  registrationToken: string;
  importUrl: string;
  importCommand: string;
  caChecksum?: string;
}

export interface Node {
  id: string;
  clusterId: string;
  ref: string;
  hostname: string;
  dockerSocket: string;
  createdAt: number;
  connected: boolean;
}

export interface ApiToken {
  id: string;
  userId: string;
  description: string;
  createdAt: number;
  expiresAt?: number | null;
  revoked?: boolean;
  lastUsedAt?: number | null;
}

export interface Grant {
  userId: string;
  clusterId: string;
  createdAt: number;
}

export class ApiError extends Error {
  constructor(
    public status: number,
    message: string,
  ) {
    super(message);
  }
}

let csrfToken = "";

export function setCsrf(token: string) {
  csrfToken = token;
}

/** The session's CSRF token, for a websocket to offer as a subprotocol (it cannot set headers). */
export function csrf(): string {
  return csrfToken;
}

export async function call<T>(method: string, path: string, body?: unknown): Promise<T> {
  const headers: Record<string, string> = { Accept: "application/json" };
  if (method !== "GET") headers["X-CSRF-Token"] = csrfToken;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, {
    method,
    headers,
    credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await resp.text();
  if (!resp.ok) {
    let message = text;
    try {
      message = JSON.parse(text).message ?? text;
    } catch {
      // plain text error
    }
    throw new ApiError(resp.status, message || `${resp.status} ${resp.statusText}`);
  }
  return (text ? JSON.parse(text) : undefined) as T;
}

export interface SessionInfo {
  user: User;
  csrfToken: string;
}

export async function signIn(token: string): Promise<SessionInfo> {
  const info = await call<SessionInfo>("POST", "/console/session", { token });
  setCsrf(info.csrfToken);
  return info;
}

export async function currentSession(): Promise<SessionInfo | null> {
  const info = await call<{ user: User | null; csrfToken?: string }>("GET", "/console/session");
  if (!info.user || !info.csrfToken) return null;
  setCsrf(info.csrfToken);
  return { user: info.user, csrfToken: info.csrfToken };
}

export async function signOut(): Promise<void> {
  await call("DELETE", "/console/session");
  setCsrf("");
}

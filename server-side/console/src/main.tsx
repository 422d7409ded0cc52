// The console's shell: sign-in, navigation (hash routes, so every page is a link that works
// with the keyboard, the back button and a reload), the live feed, and the status line that
// screen readers announce.
import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import { ApiError, currentSession, signIn, signOut, type User } from "./api";
import { AddClusterPage, ClusterPage, ClustersPage, UsersPage, useLiveFeed } from "./pages";
import { PodShellPage } from "./terminal";
import "./style.css";

function useRoute(): string {
  const [route, setRoute] = useState(location.hash.slice(1) || "/clusters");
  useEffect(() => {
    const on = () => setRoute(location.hash.slice(1) || "/clusters");
    addEventListener("hashchange", on);
    return () => removeEventListener("hashchange", on);
  }, []);
  return route;
}

function SignIn({ onSignedIn }: { onSignedIn: (u: User) => void }) {
  const [token, setToken] = useState("");
  const [error, setError] = useState("");
  const [busy, setBusy] = useState(false);
  const submit = async (e: Event) => {
    e.preventDefault();
    setBusy(true);
    setError("");
    try {
      const info = await signIn(token);
      setToken("");
      onSignedIn(info.user);
    } catch (err) {
      setError(err instanceof ApiError && err.status === 401 ? "That token is not valid." : String((err as Error).message));
    } finally {
      setBusy(false);
    }
  };
  return (
    <main id="main" class="signin">
      <h1>tunnel-server</h1>
      <form onSubmit={submit} aria-describedby={error ? "signin-error" : undefined}>
        <label for="token">API token</label>
        <input
          id="token"
          name="token"
          type="password"
          autocomplete="off"
          required
          value={token}
          onInput={(e) => setToken((e.target as HTMLInputElement).value)}
        />
        <button type="submit" disabled={busy}>
          Sign in
        </button>
        {error && (
          <p id="signin-error" role="alert" class="error">
            {error}
          </p>
        )}
      </form>
    </main>
  );
}

function Shell({ user, onSignedOut }: { user: User; onSignedOut: () => void }) {
  const route = useRoute();
  const live = useLiveFeed();
  const nav: [string, string][] = [["/clusters", "Clusters"]];
  if (user.admin) nav.push(["/clusters/new", "Add a cluster"], ["/users", "Users and tokens"]);
  const out = async () => {
    try {
      await signOut();
    } finally {
      onSignedOut();
    }
  };
  let page;
  const pods = route.match(/^\/clusters\/(c-[a-z0-9]+)\/pods$/);
  const cluster = route.match(/^\/clusters\/(c-[a-z0-9]+)$/);
  if (route === "/clusters/new" && user.admin) page = <AddClusterPage />;
  else if (pods) page = <PodShellPage id={pods[1]} />;
  else if (cluster) page = <ClusterPage id={cluster[1]} user={user} live={live} />;
  else if (route === "/users" && user.admin) page = <UsersPage />;
  else page = <ClustersPage user={user} live={live} />;
  return (
    <>
      <a class="skip" href="#main" onClick={(e) => { e.preventDefault(); document.getElementById("main")?.focus(); }}>
        Skip to content
      </a>
      <header>
        <span class="brand">tunnel-server</span>
        <nav aria-label="Main">
          <ul>
            {nav.map(([href, label]) => (
              <li key={href}>
                <a href={`#${href}`} aria-current={route === href ? "page" : undefined}>
                  {label}
                </a>
              </li>
            ))}
          </ul>
        </nav>
        <span class="who">
          <span aria-label="Signed in as">{user.name}</span>
          {user.admin && <span class="badge">admin</span>}
          <span class={`live ${live.connected ? "on" : "off"}`} title="Live updates">
            {live.connected ? "live" : "offline"}
          </span>
          <button type="button" onClick={out}>
            Sign out
          </button>
        </span>
      </header>
      <main id="main" tabIndex={-1}>
        {page}
      </main>
    </>
  );
}

function App() {
  const [user, setUser] = useState<User | null | undefined>(undefined);
  const [error, setError] = useState("");
  useEffect(() => {
    currentSession()
      .then((s) => setUser(s?.user ?? null))
      .catch((e) => setError(String(e.message)));
  }, []);
  if (error) return <p role="alert">{error}</p>;
  if (user === undefined) return <p aria-busy="true">Loading…</p>;
  if (user === null) return <SignIn onSignedIn={setUser} />;
  return <Shell user={user} onSignedOut={() => setUser(null)} />;
}

render(<App />, document.getElementById("app")!);

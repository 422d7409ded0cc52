// The web console in headless Chromium (Debian's /usr/bin/chromium driven by playwright-core:
// no browser download), against a real tunnel-server. Started by
// server-side/tests/console_browser.rs, which runs the server, a real kube-apiserver and the
// real cluster agent, and talks to this script over stdio:
//
//   script -> test:  "AGENT <cluster-id> <registration-token>"   start the cluster agent now
//   test -> script:  "started"
//
// The agent is cut off the way an admin does it: rotating the cluster's registration token on
// its page (add one, revoke the agent's), which closes the tunnels the old token opened.
//
// Environment: CONSOLE_URL, ADMIN_TOKEN, USER_TOKEN (a non-admin, bob), USER_NAME,
// OTHER_CLUSTER (a cluster bob must not see), SCREENSHOT_DIR, CHROMIUM (default
// /usr/bin/chromium). Exits 0 when every check holds; prints one line per step.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { createInterface } from "node:readline";
import { join } from "node:path";
import { request as httpsRequest } from "node:https";

const env = (k, d) => {
  const v = process.env[k] ?? d;
  if (v === undefined) throw new Error(`${k} is not set`);
  return v;
};
const url = env("CONSOLE_URL");
const adminToken = env("ADMIN_TOKEN");
const userToken = env("USER_TOKEN");
const userName = env("USER_NAME");
const otherCluster = env("OTHER_CLUSTER");
const shots = env("SCREENSHOT_DIR");
mkdirSync(shots, { recursive: true });

// How long the page may take to show a change the server already reports.
const LIVE_WITHIN_MS = 2000;

const stdinLines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
async function ask(line, answer) {
  console.log(line);
  const { value, done } = await stdinLines.next();
  if (done || value.trim() !== answer) throw new Error(`expected "${answer}" from the test, got ${value}`);
}

const errors = [];
function watch(page, who) {
  page.on("console", (m) => {
    if (m.type() === "error" || m.type() === "warning") errors.push(`${who} console ${m.type()}: ${m.text()}`);
  });
  page.on("pageerror", (e) => errors.push(`${who} page error: ${e.message}`));
  page.on("requestfailed", (r) => {
    // The event stream is cut when a page closes; nothing else may fail.
    if (!r.url().endsWith("/console/events")) errors.push(`${who} request failed: ${r.url()} ${r.failure()?.errorText}`);
  });
}

const taken = [];
async function shot(page, name) {
  const file = join(shots, name);
  await page.screenshot({ path: file, fullPage: true });
  taken.push(name);
}

function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
  console.log(`ok: ${what}`);
}

async function pollApi(ctx, path, pred, what, limitMs) {
  const t0 = Date.now();
  for (;;) {
    const r = await ctx.request.get(`${url}${path}`);
    if (r.ok() && pred(await r.json())) return Date.now();
    if (Date.now() - t0 > limitMs) throw new Error(`${what}: not within ${limitMs} ms`);
    await new Promise((res) => setTimeout(res, 50));
  }
}

async function signIn(page, token) {
  await page.goto(url);
  await page.getByLabel("API token").waitFor();
  // By keyboard: Tab to the field, type, Enter.
  for (let i = 0; i < 5; i++) {
    if (await page.evaluate(() => document.activeElement?.id === "token")) break;
    await page.keyboard.press("Tab");
  }
  check(await page.evaluate(() => document.activeElement?.id === "token"), "the token field is reached with Tab");
  await page.keyboard.type(token);
  await page.keyboard.press("Enter");
  await page.getByRole("heading", { name: "Clusters" }).waitFor();
}

const browser = await chromium.launch({
  executablePath: env("CHROMIUM", "/usr/bin/chromium"),
  headless: true,
  args: ["--no-sandbox"],
});
let failed = false;
try {
  // --- the admin
  const admin = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1200, height: 800 } });
  await admin.grantPermissions(["clipboard-read", "clipboard-write"], { origin: url });
  const page = await admin.newPage();
  watch(page, "admin");
  await page.goto(url);
  await page.getByLabel("API token").waitFor();
  await shot(page, "01-sign-in.png");
  await signIn(page, adminToken);

  const cookies = await admin.cookies(url);
  const session = cookies.find((c) => c.name === "tunnel_session");
  check(session && session.httpOnly && session.secure && session.sameSite === "Strict", "the session cookie is HttpOnly, Secure, SameSite=Strict");
  check(!(await page.evaluate(() => document.cookie.includes("tunnel_session"))), "scripts cannot read the session cookie");
  const noCsrf = await admin.request.post(`${url}/v1/clusters`, { data: { name: "csrf-probe" } });
  check(noCsrf.status() === 403, `a mutation with the cookie but without the CSRF token is refused (${noCsrf.status()})`);
  const badCsrf = await admin.request.post(`${url}/v1/clusters`, {
    data: { name: "csrf-probe" },
    headers: { "X-CSRF-Token": "not-the-token" },
  });
  check(badCsrf.status() === 403, `a mutation with a wrong CSRF token is refused (${badCsrf.status()})`);
  await shot(page, "02-clusters.png");

  // Add a cluster; the import command and its copy button.
  await page.getByRole("link", { name: "Add a cluster" }).click();
  await page.getByLabel("Cluster name").fill("web");
  await page.getByRole("button", { name: "Create", exact: true }).click();
  const command = (await page.locator("#import-command").textContent()) ?? "";
  const m = command.match(/\/v3\/import\/([a-z0-9]+)_(c-[a-z0-9]+)\.yaml/);
  check(m !== null, `the import command is shown: ${command}`);
  const [, regToken, clusterId] = m;
  await page.getByRole("button", { name: "Copy the import command" }).click();
  await page.getByText("Copied.").waitFor();
  check((await page.evaluate(() => navigator.clipboard.readText())) === command, "Copy puts the import command on the clipboard");
  await shot(page, "03-add-cluster.png");

  // The list, live: mark the document to prove it is never reloaded.
  await page.getByRole("link", { name: "Clusters", exact: true }).click();
  const row = page.locator('tr[data-cluster="web"] td.connected');
  await row.getByText("Disconnected").waitFor();
  await page.evaluate(() => (window.__notReloaded = true));
  await page.locator(".live.on").waitFor();

  const agentStart = Date.now();
  await ask(`AGENT ${clusterId} ${regToken}`, "started");
  const apiConnected = await pollApi(admin, `/v1/clusters/${clusterId}`, (c) => c.connected === true, "the API says Connected", 60000);
  await row.getByText("Connected", { exact: true }).waitFor({ timeout: Math.max(1, apiConnected + LIVE_WITHIN_MS - Date.now()) });
  const pageConnected = Date.now();
  check(await page.evaluate(() => window.__notReloaded === true), "the page was not reloaded");
  console.log(
    `live: agent started -> API Connected in ${apiConnected - agentStart} ms, page showed it ${Math.max(0, pageConnected - apiConnected)} ms later (limit ${LIVE_WITHIN_MS} ms)`,
  );
  check(true, "the cluster turned Connected on the page without a reload, within 2 s of the server");
  await shot(page, "04-clusters-connected.png");

  // The cluster's page.
  await page.getByRole("link", { name: "web", exact: true }).click();
  await page.getByRole("heading", { name: "Cluster web" }).waitFor();
  await page.getByText("Tunnel owner").waitFor();
  await page.getByRole("heading", { name: "Registration tokens" }).waitFor();
  await shot(page, "05-cluster.png");

  // Its pods page: the namespaces come from the cluster's own API, through the tunnel. (No
  // shell: this kube-apiserver has no kubelet, so no pod can run or exec.)
  await page.getByRole("link", { name: "Pods: shells and logs" }).click();
  await page.getByRole("heading", { name: /^Pods of / }).waitFor();
  const nsSelect = page.getByLabel("Namespace", { exact: true });
  await nsSelect
    .locator("option", { hasText: "kube-system" })
    .waitFor({ state: "attached" })
    .catch(async (e) => {
      throw new Error(`${e.message}\npage says: ${await page.locator("[role=alert]").allTextContents()}`);
    });
  await nsSelect.selectOption("default");
  check(
    await page.getByRole("button", { name: "Open a shell" }).isDisabled(),
    "the pods page lists the cluster's namespaces through the tunnel; no pod, so no shell to open",
  );
  await shot(page, "05-cluster-pods.png");

  // The exec websocket's handshake as the page's shell makes it, by hand (a browser WebSocket
  // does not expose the status): without the CSRF token our server refuses it (403); with the
  // token offered as a subprotocol it reaches the kube-apiserver through the tunnel, which
  // answers that the pod does not exist (404).
  const cookie = (await page.context().cookies()).find((c) => c.name === "tunnel_session");
  const { csrfToken } = await (await page.context().request.get(`${url}/console/session`)).json();
  const execStatus = (protocols) =>
    new Promise((resolve, reject) => {
      const req = httpsRequest(
        `${url}/k8s/clusters/${clusterId}/api/v1/namespaces/default/pods/nope/exec?command=sh&stdin=true&stdout=true&tty=true`,
        {
          rejectUnauthorized: false,
          headers: {
            Cookie: `tunnel_session=${cookie.value}`,
            Connection: "Upgrade",
            Upgrade: "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Protocol": protocols,
          },
        },
      );
      req.on("response", (r) => {
        let body = "";
        r.setEncoding("utf8");
        r.on("data", (d) => {
          if (body.length < 4096) body += d;
        });
        r.on("end", () => resolve({ status: r.statusCode, body }));
      });
      req.on("upgrade", (r, socket) => {
        socket.destroy();
        resolve({ status: r.statusCode, body: "" });
      });
      req.on("error", reject);
      req.setTimeout(10000, () => req.destroy(new Error("exec handshake timed out")));
      req.end();
    });
  const refused = await execStatus("v5.channel.k8s.io");
  check(refused.status === 403, `an exec websocket on the session without the CSRF token is refused (${refused.status})`);
  const reached = await execStatus(`v5.channel.k8s.io, v4.channel.k8s.io, csrf.tunnel-server.${csrfToken}`);
  check(
    reached.status === 404 && reached.body.includes('pods \\"nope\\" not found'),
    `with the token as a subprotocol it reaches the kube-apiserver: ${reached.status} ${reached.body.trim()}`,
  );

  // Users and tokens: grant bob the new cluster from the page.
  await page.getByRole("link", { name: "Users and tokens" }).click();
  await page.getByRole("heading", { name: "Grants" }).waitFor();
  await page.getByLabel("User", { exact: true }).nth(1).selectOption({ label: userName });
  await page.getByLabel("Cluster", { exact: true }).selectOption({ label: "web" });
  await page.getByRole("button", { name: "Grant", exact: true }).click();
  await page.getByText("Grant added.").waitFor();
  await shot(page, "06-users.png");

  // A narrow screen: nothing wider than the viewport.
  await page.setViewportSize({ width: 375, height: 740 });
  await page.getByRole("link", { name: "Clusters", exact: true }).click();
  await page.locator('tr[data-cluster="web"]').waitFor();
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  check(overflow <= 0, `on a 375 px screen the page does not scroll sideways (${overflow} px over)`);
  await shot(page, "07-narrow-clusters.png");
  await page.setViewportSize({ width: 1200, height: 800 });

  // --- the non-admin
  const bobCtx = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1200, height: 800 } });
  const bob = await bobCtx.newPage();
  watch(bob, "bob");
  await signIn(bob, userToken);
  await bob.locator('tr[data-cluster="web"]').waitFor();
  const names = await bob.locator("tr[data-cluster]").evaluateAll((rows) => rows.map((r) => r.getAttribute("data-cluster")));
  check(JSON.stringify(names) === JSON.stringify(["web"]), `the non-admin sees only the granted cluster: ${JSON.stringify(names)}`);
  check((await bob.getByRole("link", { name: "Users and tokens" }).count()) === 0, "the non-admin has no users page");
  const other = await bobCtx.request.get(`${url}/v1/clusters/${otherCluster}`);
  check(other.status() === 404, `another cluster is not found for the non-admin (${other.status()})`);
  const users = await bobCtx.request.get(`${url}/v1/users`);
  check(users.status() === 403, `the users API refuses the non-admin (${users.status()})`);
  await shot(bob, "08-non-admin-clusters.png");

  // Rotate the registration token on the cluster's page: add one, revoke the agent's; the
  // tunnels it opened close and both pages turn Disconnected live.
  await page.getByRole("link", { name: "Clusters", exact: true }).click();
  await page.getByRole("link", { name: "web", exact: true }).click();
  await page.getByRole("button", { name: "Add a token" }).click();
  await page.getByText("Token added.").waitFor();
  await page.locator("ul.tokens li").nth(1).waitFor();
  await shot(page, "09-cluster-token-rotation.png");
  await page.locator("ul.tokens li", { hasText: regToken }).getByRole("button", { name: /Revoke/ }).click();
  await page.getByText("Token revoked.").waitFor();
  // The list is re-read after the revocation: wait for it, then count.
  await page.locator("ul.tokens li", { hasText: regToken }).waitFor({ state: "detached" });
  check((await page.locator("ul.tokens li").count()) === 1, "the revoked token is gone from the page, the new one stays");
  await page.getByRole("link", { name: "Clusters", exact: true }).click();
  const apiDown = await pollApi(admin, `/v1/clusters/${clusterId}`, (c) => c.connected === false, "the API says Disconnected", 30000);
  const limit = Math.max(1, apiDown + LIVE_WITHIN_MS - Date.now());
  await page.locator('tr[data-cluster="web"] td.connected').getByText("Disconnected").waitFor({ timeout: limit });
  await bob.locator('tr[data-cluster="web"] td.connected').getByText("Disconnected").waitFor({ timeout: limit });
  console.log(`live: page showed Disconnected ${Math.max(0, Date.now() - apiDown)} ms after the API (limit ${LIVE_WITHIN_MS} ms)`);
  check(await page.evaluate(() => window.__notReloaded === true), "the page was still not reloaded");
  await shot(page, "10-clusters-disconnected.png");

  // Sign out.
  await bob.getByRole("button", { name: "Sign out" }).click();
  await bob.getByLabel("API token").waitFor();
  const after = await bobCtx.request.get(`${url}/v1/clusters`);
  check(after.status() === 401, `after signing out the cookie opens nothing (${after.status()})`);

  check(errors.length === 0, `no console errors on any page${errors.length ? ":\n  " + errors.join("\n  ") : ""}`);
} catch (e) {
  failed = true;
  console.log(`FAILED: ${e.message}`);
  if (errors.length) console.log(`console errors:\n  ${errors.join("\n  ")}`);
} finally {
  console.log(`screenshots in ${shots}: ${taken.join(" ")}`);
  await browser.close();
}
process.exit(failed ? 1 : 0);

// The dashboard and the load report in Debian's headless Chromium
// (playwright-core). Run by tests/browser.sh, which starts the system and
// places an order first. Environment:
//   GATEWAY   the gateway's base URL
//   ORDER_ID  a CONFIRMED order placed through it
//   REPORT    a `bazaar load --report` HTML file
//   OUT       where the screenshots go
// Fails (exit 1) on a console error, a page error, a missing service, or
// an order whose timeline or trace does not show.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";

const { GATEWAY, ORDER_ID, REPORT, OUT } = process.env;
for (const [k, v] of Object.entries({ GATEWAY, ORDER_ID, REPORT, OUT })) {
  if (!v) throw new Error(`${k} is not set`);
}
mkdirSync(OUT, { recursive: true });
const SERVICES = ["gateway", "auth", "users", "catalog", "inventory", "orders", "payments", "notifications"];
const TIMEOUT = 15000;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
let failed = false;
function fail(message) {
  console.error("browser: " + message);
  failed = true;
}

async function watched(name) {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  const problems = [];
  page.on("console", (m) => { if (m.type() === "error") problems.push(`console error: ${m.text()}`); });
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("requestfailed", (r) => problems.push(`request failed: ${r.url()} (${r.failure()?.errorText})`));
  return { page, problems, name };
}

async function step(what, fn) {
  try {
    await fn();
    console.log("browser: " + what);
  } catch (e) {
    fail(`${what}: ${e.message.split("\n")[0]}`);
  }
}

// ---- the dashboard ----
{
  const { page, problems } = await watched("dashboard");
  await step("the dashboard loads", async () => {
    const res = await page.goto(GATEWAY + "/_dashboard", { waitUntil: "load" });
    if (!res.ok()) throw new Error(`answered ${res.status()}`);
    await page.waitForSelector("#board:not([hidden])", { timeout: TIMEOUT });
  });
  await step("every service is shown, in the table and on the map", async () => {
    await page.waitForFunction((names) => names.every((n) =>
      document.querySelector(`#services-table tr[data-service="${n}"]`) &&
      document.querySelector(`#map-svg .node[data-service="${n}"]`)), SERVICES, { timeout: TIMEOUT });
  });
  await step("live updates arrive (server-sent events)", async () => {
    await page.waitForSelector("#live.on", { timeout: TIMEOUT });
    const first = await page.textContent("#live");
    await page.waitForFunction((t) => document.querySelector("#live").textContent !== t, first, { timeout: TIMEOUT });
  });
  await step("the map shows calls between services", async () => {
    await page.waitForFunction(() => document.querySelectorAll("#map-svg path.edge").length >= 5, null, { timeout: TIMEOUT });
  });
  await step("requests per route are listed", async () => {
    await page.waitForFunction(() => document.querySelectorAll("#routes-table tbody tr").length >= 5, null, { timeout: TIMEOUT });
  });
  await step("queues are listed with their consumers", async () => {
    await page.waitForFunction(() => [...document.querySelectorAll("#queues-table tbody tr")].some((r) => r.textContent.includes("orders.saga")), null, { timeout: TIMEOUT });
  });
  await page.screenshot({ path: `${OUT}/dashboard.png`, fullPage: true });

  await step("searching the order shows its timeline", async () => {
    await page.fill("#search", ORDER_ID);
    await page.click("#search-form button");
    await page.waitForFunction(() => document.querySelectorAll("#timeline-rows .tl-row").length >= 8, null, { timeout: TIMEOUT });
    const saga = await page.$$eval("#timeline-rows .tl-row.saga", (rows) => rows.map((r) => r.textContent));
    if (!saga.some((t) => t.includes("CONFIRMED"))) throw new Error(`no CONFIRMED step among ${JSON.stringify(saga)}`);
    const kinds = await page.$$eval("#timeline-rows .tl-row", (rows) => [...new Set(rows.map((r) => r.dataset.what))]);
    for (const k of ["written", "published", "delivered", "handled", "saga"]) {
      if (!kinds.includes(k)) throw new Error(`no "${k}" event; saw ${kinds.join(", ")}`);
    }
  });
  await step("…and its trace as a waterfall across five services or more", async () => {
    await page.click("#timeline-traces a.trace-link");
    await page.waitForFunction(() => document.querySelectorAll("#waterfall-rows .wf-row").length >= 10, null, { timeout: TIMEOUT });
    const services = await page.$$eval("#waterfall-rows .wf-name strong", (s) => [...new Set(s.map((e) => e.textContent))]);
    if (services.length < 5) throw new Error(`the trace shows ${services.join(", ")}`);
  });
  await step("a span's attributes open on click", async () => {
    await page.click("#waterfall-rows .wf-row");
    const detail = await page.textContent("#span-detail");
    if (!detail.includes("span_id")) throw new Error("no span detail");
  });
  await page.locator("#timeline").screenshot({ path: `${OUT}/timeline.png` });
  await page.locator("#traces").screenshot({ path: `${OUT}/trace.png` });
  await step("the dead-letter view and the replays list answer", async () => {
    await page.waitForFunction(() => document.querySelector("#dlq-table tbody").textContent.includes("No dead letter matches"), null, { timeout: TIMEOUT });
    await page.waitForFunction(() => document.querySelector("#replays-table tbody tr") !== null, null, { timeout: TIMEOUT });
  });
  await page.screenshot({ path: `${OUT}/dashboard-order.png`, fullPage: true });
  for (const p of problems) fail(p);
  await page.close();
}

// ---- the load report, offline ----
{
  const { page, problems } = await watched("report");
  const requests = [];
  page.on("request", (r) => requests.push(r.url()));
  await step("the load report opens with no network", async () => {
    await page.goto("file://" + REPORT, { waitUntil: "load" });
    const foreign = requests.filter((u) => !u.startsWith("file://") && !u.startsWith("data:"));
    if (foreign.length) throw new Error(`it asked the network for ${foreign.join(", ")}`);
    const plots = await page.$$eval("svg", (s) => s.length);
    if (plots < 3) throw new Error(`${plots} plots`);
    const text = await page.textContent("body");
    if (!/confirmed/i.test(text)) throw new Error("no outcomes in the report");
  });
  await page.screenshot({ path: `${OUT}/load-report.png`, fullPage: true });
  for (const p of problems) fail(p);
  await page.close();
}

await browser.close();
if (failed) process.exit(1);
console.log(`browser: all passed; screenshots in ${OUT}`);

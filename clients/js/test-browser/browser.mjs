// The browser tests' tools: a real `quire serve` (test/helpers.mjs) serving the demo page,
// Debian's chromium driven by playwright-core (which never downloads a browser), a TCP
// proxy in front of the server whose live connections can be cut, pages of the demo, and
// their editors' text, cursors and screenshots.
//
// CHROMIUM: the browser (default /usr/bin/chromium). QUIRE_ARTIFACTS: where screenshots go
// (default clients/js/test-artifacts).
import { createServer, connect } from "node:net";
import { mkdirSync } from "node:fs";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { before, after } from "node:test";
import { chromium } from "playwright-core";
import { startServer } from "../test/helpers.mjs";

const here = fileURLToPath(new URL(".", import.meta.url));
export const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
export const ARTIFACTS = resolve(process.env.QUIRE_ARTIFACTS ?? join(here, "../test-artifacts"));

/** `quire serve` with its HTTP listener; `http` is the demo page's base URL. */
export async function startDemoServer() {
  const server = await startServer();
  const u = new URL(server.url);
  return { ...server, http: `http://${u.host}/`, httpPort: Number(u.port) };
}

/**
 * A test file's demo server and browser: started before its tests, and closed after them
 * whatever happened (a failed test never leaves them running). `server` and `browser`
 * are set once the file's tests run.
 */
export function demoServerAndBrowser() {
  const setup = { server: null, browser: null };
  before(async () => {
    setup.server = await startDemoServer();
    setup.browser = await launch();
  });
  after(async () => {
    await setup.browser?.close();
    await setup.server?.stop();
  });
  return setup;
}

export async function launch() {
  // As root, chromium refuses to start without --no-sandbox.
  return chromium.launch({ executablePath: CHROMIUM, headless: true, args: ["--no-sandbox"] });
}

/**
 * A TCP proxy to 127.0.0.1:`port`: `cutAll()` resets every connection through it (a lost
 * network, as the browser's live WebSocket sees it: its offline emulation leaves open
 * sockets alone) and refuses new ones until `restore()`; `requestsWhileCut` counts
 * the requests sent on those (none while the browser itself is offline).
 */
export async function cuttableProxy(port) {
  const live = new Set();
  const ctl = { cut: false, requestsWhileCut: 0 };
  const server = createServer((down) => {
    if (ctl.cut) {
      // Chromium may open a connection ahead of need (a preconnect) whatever its network
      // emulation: only one that sends a request counts.
      down.once("data", () => ctl.requestsWhileCut++);
      down.on("error", () => {});
      setTimeout(() => down.resetAndDestroy(), 200);
      return;
    }
    const up = connect(port, "127.0.0.1");
    const pair = { down, up };
    live.add(pair);
    const drop = () => {
      live.delete(pair);
      down.destroy();
      up.destroy();
    };
    down.on("error", drop).on("close", drop);
    up.on("error", drop).on("close", drop);
    down.pipe(up);
    up.pipe(down);
  });
  await new Promise((res) => server.listen(0, "127.0.0.1", res));
  ctl.port = server.address().port;
  ctl.http = `http://127.0.0.1:${ctl.port}/`;
  ctl.cutAll = () => {
    ctl.cut = true;
    for (const { down, up } of live) {
      down.resetAndDestroy();
      up.destroy();
    }
    live.clear();
  };
  ctl.restore = () => {
    ctl.cut = false;
  };
  ctl.close = () =>
    new Promise((res) => {
      ctl.cutAll();
      server.close(() => res());
    });
  return ctl;
}

/**
 * A page of the demo at `base` + `#doc`, in its own browser context (its own IndexedDB
 * and sessionStorage: another client). With `cacheForOffline`, the context serves the
 * page and its script from what it last fetched while the test has it offline, so that
 * it reloads without a network (the demo has no service worker); anything else is
 * refused as with no network.
 */
export async function openDemo(browser, base, doc, { cacheForOffline = false, viewport = { width: 800, height: 500 } } = {}) {
  // A page served from the test's cache counts as not local: it may reach the loopback
  // server only with the local-network-access permission (Chromium's Local Network Access).
  const context = await browser.newContext({ viewport, permissions: cacheForOffline ? ["local-network-access"] : [] });
  const page = await context.newPage();
  const logs = [];
  page.on("console", (m) => logs.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => logs.push(`pageerror: ${e.message}`));
  const demo = { context, page, logs, offline: false };
  if (cacheForOffline) {
    const cache = new Map();
    const origin = new URL(base).origin;
    await context.route(
      (url) => url.origin === origin && (url.pathname === "/" || url.pathname === "/demo.js" || url.pathname === "/favicon.ico"),
      async (route) => {
        const path = new URL(route.request().url()).pathname;
        if (!demo.offline) {
          const response = await route.fetch();
          cache.set(path, { status: response.status(), headers: response.headers(), body: await response.body() });
          return route.fulfill({ response });
        }
        const hit = cache.get(path);
        return hit ? route.fulfill(hit) : route.abort("internetdisconnected");
      },
    );
  }
  /** The driver's offline mode, with the page's cached files served meanwhile. */
  demo.setOffline = async (offline) => {
    demo.offline = offline;
    await context.setOffline(offline);
  };
  await page.goto(`${base}#${encodeURIComponent(doc)}`);
  await waitUntil(page, () => document.querySelector("#status")?.className === "connected", null, "the page to connect", { describe: async () => `status: ${await status(page)}; console: ${logs.join(" / ")}` });
  return demo;
}

/**
 * Polls `fn` in `page` until it returns a truthy value, for at most `ms`; fails with
 * `what` and, if given, `describe()` (e.g. both editors' texts).
 */
export async function waitUntil(page, fn, arg, what, { ms = 30_000, describe } = {}) {
  try {
    const handle = await page.waitForFunction(fn, arg, { timeout: ms, polling: 20 });
    return handle.jsonValue();
  } catch (e) {
    const more = describe ? `\n${await describe().catch((d) => `(could not describe: ${d})`)}` : "";
    throw new Error(`gave up waiting for ${what} after ${ms} ms: ${e.message.split("\n")[0]}${more}`);
  }
}

/** Polls an async condition in the test (across pages) with a deadline. */
export async function eventually(cond, what, { ms = 30_000, describe } = {}) {
  const start = Date.now();
  for (;;) {
    if (await cond()) return;
    if (Date.now() - start > ms) {
      const more = describe ? `\n${await describe().catch((d) => `(could not describe: ${d})`)}` : "";
      throw new Error(`gave up waiting for ${what} after ${ms} ms${more}`);
    }
    await new Promise((r) => setTimeout(r, 25));
  }
}

/**
 * The editor's document as CodeMirror holds it (`state`), and as the page shows it
 * (`shown`: its lines' text without the remote cursors' labels).
 */
export async function editorText(page) {
  return page.evaluate(() => {
    const content = document.querySelector(".cm-content");
    // The demo bundle's CodeMirror keeps its view on the content element's tile.
    const view = content?.cmTile?.root?.view ?? content?.cmView?.rootView?.view;
    if (!view) throw new Error("no CodeMirror view on .cm-content");
    const lines = [...content.querySelectorAll(".cm-line")].map((line) => {
      const copy = line.cloneNode(true);
      for (const w of copy.querySelectorAll(".cm-quire-caret, .cm-widgetBuffer")) w.remove();
      return copy.textContent;
    });
    return { state: view.state.doc.toString(), shown: lines.join("\n") };
  });
}

export const status = (page) => page.evaluate(() => document.querySelector("#status").textContent);

/** This page's client as the demo labels it ("client 1234", from "You are client 1234."). */
export async function myLabel(page) {
  await waitUntil(page, () => /You are (.+)\./.test(document.querySelector("#me").textContent), null, "the page to say who it is");
  return page.evaluate(() => /You are (.+)\./.exec(document.querySelector("#me").textContent)[1]);
}

/** Waits until every page's editor holds the same text with `strings` in it; returns it. */
export async function converged(pages, strings, what, ms = 30_000) {
  let last = [];
  await eventually(
    async () => {
      last = await Promise.all(pages.map((p) => editorText(p)));
      const t = last[0].state;
      return last.every((x) => x.state === t && x.shown === t) && strings.every((s) => t.includes(s));
    },
    what,
    { ms, describe: async () => describeTexts(last, strings) },
  );
  return last[0].state;
}

export function describeTexts(texts, strings = []) {
  const lines = texts.map((x, i) => `page ${i}: state ${JSON.stringify(x.state)}${x.shown === x.state ? "" : ` shown ${JSON.stringify(x.shown)}`}`);
  const missing = strings.filter((s) => !texts.every((x) => x.state.includes(s)));
  return [...lines, `expected in every text: ${JSON.stringify(strings)}; missing somewhere: ${JSON.stringify(missing)}`].join("\n");
}

/** Clicks into the editor and puts the cursor at the end of the document. */
export async function cursorToEnd(page) {
  await page.click(".cm-content");
  await page.keyboard.press("Control+End");
}

export async function cursorToStart(page) {
  await page.click(".cm-content");
  await page.keyboard.press("Control+Home");
}

/** Writes `page`'s screenshot to ARTIFACTS/`name`.png. */
export async function screenshot(page, name) {
  mkdirSync(ARTIFACTS, { recursive: true });
  const path = join(ARTIFACTS, `${name}.png`);
  await page.screenshot({ path });
  return path;
}

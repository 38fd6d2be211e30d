// A page of the demo goes offline in a real headless Chromium, edits, is reloaded while
// still offline (its edits come back from IndexedDB), edits again, and goes online: both
// pages end with every edit of both.
//
// Offline is the driver's (`context.setOffline(true)`: Chromium refuses every new
// connection of the page). Two things it does not do are done beside it: it leaves an
// open WebSocket alone, so page a reaches the server through a TCP proxy whose
// connections the test cuts at the same moment (as a lost network would); and the page
// has nothing to reload from, so its context serves the page and its script, while
// offline, from the copies it fetched online (the demo has no service worker).
import { test } from "node:test";
import assert from "node:assert/strict";
import { serverText } from "../test/helpers.mjs";
import { DocState } from "../dist/doc.js";
import {
  demoServerAndBrowser,
  cuttableProxy,
  openDemo,
  converged,
  cursorToEnd,
  cursorToStart,
  editorText,
  eventually,
  screenshot,
  status,
  waitUntil,
} from "./browser.mjs";

const setup = demoServerAndBrowser();

/** Every edit is in `text` exactly once, and nothing else is (they are all inserts). */
function assertEachOnce(text, edits) {
  for (const e of edits) assert.equal(text.split(e).length - 1, 1, `${JSON.stringify(e)} once in ${JSON.stringify(text)}`);
  assert.equal(text.length, edits.reduce((n, e) => n + e.length, 0), `nothing but the edits in ${JSON.stringify(text)}`);
}

/** The text of `doc` that page's IndexedDB holds (restored as the client restores it). */
async function storedText(page, doc) {
  const state = await page.evaluate(
    () =>
      new Promise((resolve, reject) => {
        const req = indexedDB.open("quire-demo", 1);
        req.onerror = () => reject(req.error);
        req.onsuccess = () => {
          const get = req.result.transaction("state", "readonly").objectStore("state").get(`tab-${sessionStorage.quireTab}`);
          get.onsuccess = () => {
            req.result.close();
            resolve(get.result ?? null);
          };
          get.onerror = () => reject(get.error);
        };
      }),
  );
  const saved = state?.docs?.[doc];
  return saved ? DocState.restore(saved).text : null;
}

test("offline (the driver's mode), edits, a reload while offline, online again: every edit of both pages", { timeout: 150_000 }, async () => {
  const { server, browser } = setup;
  const doc = "offline";
  const proxy = await cuttableProxy(server.httpPort);
  const a = await openDemo(browser, proxy.http, doc, { cacheForOffline: true });
  const b = await openDemo(browser, server.http, doc);
  const texts = async () => `a: ${JSON.stringify(await editorText(a.page))}\nb: ${JSON.stringify(await editorText(b.page))}\na's status: ${await status(a.page)}\na's console: ${a.logs.slice(-5).join(" / ")}`;
  try {
    const start = "start\n";
    await cursorToEnd(a.page);
    await a.page.keyboard.type(start);
    await converged([a.page, b.page], [start], "b to show a's first line");

    await a.setOffline(true);
    proxy.cutAll();
    await waitUntil(a.page, () => document.querySelector("#status").textContent.startsWith("disconnected"), null, "a to see it is disconnected", { describe: texts });

    const aOffline1 = "a-offline-1";
    const bOnline1 = "b-online-1 ";
    await cursorToEnd(a.page);
    await a.page.keyboard.type(aOffline1);
    await cursorToStart(b.page);
    await b.page.keyboard.type(bOnline1);
    // b's edit reaches the server; a's does not, nor does b's reach a.
    await eventually(async () => (await serverText(server.url, doc)).includes(bOnline1), "b's edit to reach the server", { describe: texts });
    assert.ok(!(await serverText(server.url, doc)).includes(aOffline1), "a's offline edit is not on the server");
    assert.ok(!(await editorText(b.page)).state.includes(aOffline1), "b does not see a's offline edit");
    assert.ok(!(await editorText(a.page)).state.includes(bOnline1), "a, offline, does not see b's edit");
    assert.notEqual(await status(a.page), "connected");

    // Reloaded once the edit is in IndexedDB (the client saves each edit as it is made).
    await eventually(async () => (await storedText(a.page, doc))?.includes(aOffline1), "a's IndexedDB to hold its offline edit", { describe: texts });
    await a.page.reload();
    await waitUntil(a.page, (s) => document.querySelector(".cm-content")?.textContent.includes(s), aOffline1, "a, reloaded offline, to show its offline edit", { describe: texts });
    assert.equal((await editorText(a.page)).state, `${start}${aOffline1}`, "a shows what it had: its edits from IndexedDB, nothing of b's");
    await waitUntil(a.page, () => document.querySelector("#status").textContent.startsWith("disconnected"), null, "a, reloaded, to be disconnected", { describe: texts });

    const aOffline2 = "a-offline-2";
    const bOnline2 = "b-online-2 ";
    await cursorToEnd(a.page);
    await a.page.keyboard.type(aOffline2);
    await cursorToStart(b.page);
    await b.page.keyboard.type(bOnline2);
    await eventually(async () => (await serverText(server.url, doc)).includes(bOnline2), "b's second edit to reach the server", { describe: texts });
    assert.ok(!(await serverText(server.url, doc)).includes(aOffline1), "a's offline edits are still not on the server");
    await screenshot(a.page, "offline-a-reloaded-offline");
    assert.equal(proxy.requestsWhileCut, 0, "the page sent no request while offline");

    await a.setOffline(false);
    proxy.restore();
    // The client retries with a backoff of up to 10 s.
    await waitUntil(a.page, () => document.querySelector("#status").className === "connected", null, "a to reconnect", { ms: 40_000, describe: texts });
    const every = [start, aOffline1, aOffline2, bOnline1, bOnline2];
    const text = await converged([a.page, b.page], every, "both pages to hold every edit");
    assertEachOnce(text, every);
    assert.equal(await serverText(server.url, doc), text, "the server has the pages' text");
  } finally {
    await screenshot(a.page, "offline-a").catch(() => {});
    await screenshot(b.page, "offline-b").catch(() => {});
    await a.context.close();
    await b.context.close();
    await proxy.close();
  }
});

test("the demo's Go offline button: edits queue, and are sent on Go online", { timeout: 120_000 }, async () => {
  const { server, browser } = setup;
  const doc = "button";
  const a = await openDemo(browser, server.http, doc);
  const b = await openDemo(browser, server.http, doc);
  const texts = async () => `a: ${JSON.stringify(await editorText(a.page))}\nb: ${JSON.stringify(await editorText(b.page))}`;
  try {
    await a.page.click("#offline");
    await waitUntil(a.page, () => document.querySelector("#status").className === "offline" && document.querySelector("#offline").textContent === "Go online", null, "a to be offline");
    const aOffline = "queued by a";
    const bOnline = "typed by b ";
    await cursorToEnd(a.page);
    await a.page.keyboard.type(aOffline);
    await cursorToStart(b.page);
    await b.page.keyboard.type(bOnline);
    await eventually(async () => (await serverText(server.url, doc)).includes(bOnline), "b's edit to reach the server", { describe: texts });
    assert.ok(!(await serverText(server.url, doc)).includes(aOffline), "a's edit waits while a is offline");
    assert.equal((await editorText(a.page)).state, aOffline, "a, offline, has only its own edit");

    await a.page.click("#offline");
    await waitUntil(a.page, () => document.querySelector("#status").className === "connected" && document.querySelector("#offline").textContent === "Go offline", null, "a to be online");
    const text = await converged([a.page, b.page], [aOffline, bOnline], "both pages to hold both edits");
    assertEachOnce(text, [aOffline, bOnline]);
    assert.equal(await serverText(server.url, doc), text);
  } finally {
    await screenshot(a.page, "button-a").catch(() => {});
    await screenshot(b.page, "button-b").catch(() => {});
    await a.context.close();
    await b.context.close();
  }
});

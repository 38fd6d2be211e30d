// Two pages of the demo in a real headless Chromium, each its own client (its own browser
// context: sessionStorage, IndexedDB), typing with the keyboard into CodeMirror at the
// same time, at different places and at the same place: both end with the same text,
// holding every keystroke of both, as the server has it.
import { test } from "node:test";
import assert from "node:assert/strict";
import { serverText } from "../test/helpers.mjs";
import { demoServerAndBrowser, openDemo, converged, cursorToEnd, cursorToStart, screenshot, describeTexts, editorText } from "./browser.mjs";

const setup = demoServerAndBrowser();

test("two pages typing at once converge on a text with every keystroke of both", { timeout: 120_000 }, async () => {
  const { server, browser } = setup;
  const doc = "converge";
  const a = await openDemo(browser, server.http, doc);
  const b = await openDemo(browser, server.http, doc);
  try {
    const start = "one\ntwo\n";
    await cursorToEnd(a.page);
    await a.page.keyboard.type(start);
    await converged([a.page, b.page], [start], "b to show a's first lines");

    // Different places: a at the end of line 1, b at the start of line 2. Then the same
    // place, the end of the document, with disjoint alphabets so that each page's
    // keystrokes can be told apart however they interleave.
    const aLeft = " a-left";
    const bRight = "B-RIGHT ";
    const aTail = "alphabravocharlie";
    const bTail = "0123456789012";
    const delay = 15; // ms between keys: the two pages' keystrokes overlap in time
    await Promise.all([
      (async () => {
        await cursorToStart(a.page);
        await a.page.keyboard.press("End");
        await a.page.keyboard.type(aLeft, { delay });
        await a.page.keyboard.press("Control+End");
        await a.page.keyboard.type(aTail, { delay });
      })(),
      (async () => {
        await cursorToStart(b.page);
        await b.page.keyboard.press("ArrowDown");
        await b.page.keyboard.type(bRight, { delay });
        await b.page.keyboard.press("Control+End");
        await b.page.keyboard.type(bTail, { delay });
      })(),
    ]);

    const head = `one${aLeft}\n${bRight}two\n`;
    const text = await converged([a.page, b.page], [head], "both pages to hold the same text with every edit");
    const tail = text.slice(head.length);
    const detail = describeTexts([await editorText(a.page), await editorText(b.page)]);
    assert.ok(text.startsWith(head), `the edits at different places are where they were typed:\n${detail}`);
    assert.equal(tail.replace(/[^a-z]/g, ""), aTail, `a's keystrokes at the end, in order:\n${detail}`);
    assert.equal(tail.replace(/[^0-9]/g, ""), bTail, `b's keystrokes at the end, in order:\n${detail}`);
    assert.equal(tail.length, aTail.length + bTail.length, `nothing else at the end:\n${detail}`);
    assert.equal(await serverText(server.url, doc), text, "the server has the pages' text");
  } finally {
    await screenshot(a.page, "converge-a").catch(() => {});
    await screenshot(b.page, "converge-b").catch(() => {});
    await a.context.close();
    await b.context.close();
  }
});

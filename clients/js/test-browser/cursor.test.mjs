// A remote cursor in a real headless Chromium: page a puts its cursor after a known
// character with the keyboard; page b draws a's caret, labelled with a's name, at that
// character's place on screen (CodeMirror's own coordinates of it in b's editor), and
// follows a when it moves to another line.
import { test } from "node:test";
import assert from "node:assert/strict";
import { demoServerAndBrowser, openDemo, converged, cursorToEnd, cursorToStart, eventually, myLabel, screenshot } from "./browser.mjs";

const setup = demoServerAndBrowser();

/** Where page's editor has its cursor (UTF-16 offset). */
const cursorOf = (page) => page.evaluate(() => document.querySelector(".cm-content").cmTile.root.view.state.selection.main.head);

/**
 * In `page`: the remote carets drawn (box and label), and the box of the character
 * before `pos` (its right edge is where a cursor after it is), per CodeMirror.
 */
const geometry = (page, pos) =>
  page.evaluate((pos) => {
    const view = document.querySelector(".cm-content").cmTile.root.view;
    const box = (r) => r && { left: r.left, right: r.right, top: r.top, bottom: r.bottom };
    return {
      char: box(view.coordsForChar(pos - 1)),
      carets: [...document.querySelectorAll(".cm-quire-caret")].map((c) => ({
        box: box(c.getBoundingClientRect()),
        label: c.querySelector(".cm-quire-label")?.textContent ?? null,
        labelBox: box(c.querySelector(".cm-quire-label")?.getBoundingClientRect()),
        color: getComputedStyle(c).borderLeftColor,
      })),
    };
  }, pos);

/** Waits until b draws exactly one caret, labelled `label`, right after the character before `pos`. */
async function caretAt(page, pos, label, what) {
  let last;
  const tolerance = 2; // px; a character is about 8 px wide here
  await eventually(
    async () => {
      last = await geometry(page, pos);
      if (!last.char || last.carets.length !== 1) return false;
      const [c] = last.carets;
      const middle = (c.box.top + c.box.bottom) / 2;
      // The caret is a 2 px border on a zero-width span centred on the cursor's x.
      const x = (c.box.left + c.box.right) / 2;
      return c.label === label && Math.abs(x - last.char.right) <= tolerance && middle > last.char.top && middle < last.char.bottom;
    },
    what,
    { describe: async () => JSON.stringify(last) },
  );
  assert.ok(last.char.right - last.char.left > 2 * 2, `a character (${JSON.stringify(last.char)}) is wider than twice the tolerance: the caret is at this one, not a neighbour`);
  const [c] = last.carets;
  assert.ok(c.labelBox.bottom <= c.box.top + 2 && Math.abs(c.labelBox.left - c.box.left) <= 3, `the label is drawn just above the caret: ${JSON.stringify(c)}`);
  return last;
}

test("a's cursor is drawn in b at the character a put it after, with a's label", { timeout: 120_000 }, async () => {
  const { server, browser } = setup;
  const doc = "cursor";
  const a = await openDemo(browser, server.http, doc);
  const b = await openDemo(browser, server.http, doc);
  try {
    const lines = ["first line", "second line with words", "third"];
    const text = lines.join("\n");
    await cursorToEnd(a.page);
    await a.page.keyboard.type(text);
    // b has a's text before a moves: a presence that arrives before the edit it refers
    // to is clamped (the binding sends it again once its edits are acknowledged, but the
    // page a prebuilt server embeds may predate that).
    await converged([a.page, b.page], [text], "b to show a's text");
    const label = await myLabel(a.page);

    // After "second line": line 2, 11 characters in.
    const target = text.indexOf("second line") + "second line".length;
    await cursorToStart(a.page);
    await a.page.keyboard.press("ArrowDown");
    await a.page.keyboard.press("Home");
    for (let i = 0; i < "second line".length; i++) await a.page.keyboard.press("ArrowRight");
    assert.equal(await cursorOf(a.page), target, "a's cursor is where the keys put it");
    await caretAt(b.page, target, label, "b to draw a's caret after 'second line'");

    // a moves to the last line, after "thi": b's caret follows.
    const target2 = text.indexOf("third") + "thi".length;
    await a.page.keyboard.press("ArrowDown");
    await a.page.keyboard.press("Home");
    for (let i = 0; i < "thi".length; i++) await a.page.keyboard.press("ArrowRight");
    assert.equal(await cursorOf(a.page), target2, "a's cursor is where the keys put it");
    await caretAt(b.page, target2, label, "b to draw a's caret after 'thi'");
  } finally {
    await screenshot(a.page, "cursor-a").catch(() => {});
    await screenshot(b.page, "cursor-b").catch(() => {});
    await a.context.close();
    await b.context.close();
  }
});

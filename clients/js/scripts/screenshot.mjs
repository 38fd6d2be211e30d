// The README's picture of the demo (`npm run screenshot`): two tabs of the demo page side
// by side, editing one document together, each showing the other's cursor. A real
// `quire serve` (QUIRE_BIN, as the tests) and Debian's chromium (CHROMIUM) via
// playwright-core; the two pages are shot, then set side by side in a third page.
//
//   node scripts/screenshot.mjs [out.png]     (default demo/screenshot.png)
import { writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { startDemoServer, launch, openDemo, converged, cursorToEnd, myLabel, eventually } from "../test-browser/browser.mjs";

const out = process.argv[2] ?? fileURLToPath(new URL("../demo/screenshot.png", import.meta.url));
const viewport = { width: 640, height: 430 };

const server = await startDemoServer();
const browser = await launch();
try {
  const a = await openDemo(browser, server.http, "notes", { viewport });
  const b = await openDemo(browser, server.http, "notes", { viewport });
  const first = "Release checklist\n\n- browser tests in headless Chromium\n- screenshot for the README\n";
  await cursorToEnd(a.page);
  await a.page.keyboard.type(first);
  await converged([a.page, b.page], [first], "b to show a's list");
  const second = "- offline edits survive a reload\n";
  await cursorToEnd(b.page);
  await b.page.keyboard.type(second);
  await converged([a.page, b.page], [second], "a to show b's line");

  // Cursors moved once both have every edit (a presence that comes before its edit is
  // clamped): a after "browser tests", b after "offline edits".
  const place = async (page, line, column) => {
    await page.keyboard.press("Control+Home");
    for (let i = 0; i < line; i++) await page.keyboard.press("ArrowDown");
    await page.keyboard.press("Home");
    for (let i = 0; i < column; i++) await page.keyboard.press("ArrowRight");
  };
  await place(a.page, 2, "- browser tests".length);
  await place(b.page, 4, "- offline edits".length);
  const [la, lb] = [await myLabel(a.page), await myLabel(b.page)];
  const shows = (page, label) => page.evaluate((l) => [...document.querySelectorAll(".cm-quire-label")].map((e) => e.textContent).join() === l, label);
  await eventually(async () => (await shows(a.page, lb)) && (await shows(b.page, la)), "each page to show the other's cursor");

  const [pa, pb] = [await a.page.screenshot(), await b.page.screenshot()];
  const frame = await (await browser.newContext({ viewport: { width: viewport.width * 2 + 1, height: viewport.height } })).newPage();
  const img = (png) => `<img src="data:image/png;base64,${png.toString("base64")}">`;
  await frame.setContent(`<body style="margin:0;display:flex;gap:1px;background:#bbb">${img(pa)}${img(pb)}</body>`);
  await frame.waitForFunction(() => [...document.images].every((i) => i.complete && i.naturalWidth > 0));
  writeFileSync(out, await frame.screenshot());
  console.log(`wrote ${out}`);
} finally {
  await browser.close();
  await server.stop();
}

// The demo page in demo/dist is checked in (the Rust server embeds it at compile time):
// it must be what its sources build to, so that it never drifts from them. After a
// change to demo/ or src/: `npm run build:demo`, and commit demo/dist.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { buildDemo } from "../scripts/build-demo.mjs";

test("demo/dist is up to date with its sources", async () => {
  const dir = mkdtempSync(join(tmpdir(), "quire-demo-"));
  try {
    await buildDemo(dir);
    for (const name of ["index.html", "demo.js"]) {
      const built = readFileSync(join(dir, name));
      const checkedIn = readFileSync(new URL(`../demo/dist/${name}`, import.meta.url));
      assert.ok(built.equals(checkedIn), `demo/dist/${name} is stale: run npm run build:demo and commit it`);
    }
    assert.match(readFileSync(join(dir, "index.html"), "utf8"), /<script src="\/demo\.js"><\/script>/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

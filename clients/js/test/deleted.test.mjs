// A document deleted by an administrator (the admin endpoint's DELETE /docs/ID): the
// server tells each session that has it open with Error 32, and the client stops for
// good (code 32) rather than reconnect and put the user's edits into a new document
// under the same id.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { client, startServer, tempDir, waitFor } from "./helpers.mjs";

const TOKEN = "admin-token-0123456789";
let server;
before(async () => {
  const file = join(tempDir(), "admin-token");
  writeFileSync(file, TOKEN + "\n");
  server = await startServer({ adminTokenFile: file });
});
after(async () => {
  await server?.stop();
});

test("a deleted document stops its clients with code 32; a client of another is served", async () => {
  const a = await client(server.url);
  const doc = a.open("to-delete");
  await doc.edit([[0, 0, "gone soon \u{1F600}"]]);
  await doc.synced();
  const b = await client(server.url);
  const other = b.open("kept");
  await other.edit([[0, 0, "kept"]]);
  await other.synced();

  assert.ok(server.admin, "the admin endpoint's address is in the log");
  const res = await fetch(`http://${server.admin}/docs/to-delete`, {
    method: "DELETE",
    headers: { authorization: `Bearer ${TOKEN}` },
  });
  assert.equal(res.status, 200, await res.text());

  await waitFor(() => a.connectionState.state === "failed", "the client is told");
  assert.equal(a.connectionState.code, 32);
  await other.edit([[4, 0, "!"]]);
  await other.synced();
  assert.equal(other.text(), "kept!");
  await a.close();
  await b.close();
});

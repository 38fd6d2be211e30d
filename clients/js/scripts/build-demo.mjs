// Builds the demo page into `outdir` (default demo/dist, which is checked in and
// embedded by the Rust server): index.html as written, demo.js one minified bundle.
import { build } from "esbuild";
import { copyFileSync, mkdirSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { join } from "node:path";

const root = fileURLToPath(new URL("..", import.meta.url));

export async function buildDemo(outdir = join(root, "demo/dist")) {
  mkdirSync(outdir, { recursive: true });
  await build({
    entryPoints: [join(root, "demo/demo.ts")],
    outfile: join(outdir, "demo.js"),
    bundle: true,
    minify: true,
    format: "iife",
    platform: "browser",
    target: "es2022",
    legalComments: "none",
    logLevel: "warning",
  });
  copyFileSync(join(root, "demo/index.html"), join(outdir, "index.html"));
}

if (process.argv[1] === fileURLToPath(import.meta.url)) await buildDemo(process.argv[2]);

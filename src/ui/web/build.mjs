// Bundles the dashboard into OUTDIR (argv[2]): app.js and app.css (xterm.js included, so the
// page needs no network but its own server), index.html and the icon. Run by scripts/build-ui.sh.
import * as esbuild from 'esbuild';
import { copyFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';

const out = process.argv[2];
if (!out) {
  console.error('usage: node build.mjs OUTDIR');
  process.exit(2);
}
mkdirSync(out, { recursive: true });
await esbuild.build({
  entryPoints: { app: 'js/main.js', 'app-style': 'style.css' },
  bundle: true,
  minify: true,
  sourcemap: 'linked',
  format: 'esm',
  target: ['chrome110', 'firefox115', 'safari16'],
  outdir: out,
  logLevel: 'warning',
  legalComments: 'linked',
});
for (const f of ['index.html', 'favicon.svg']) copyFileSync(f, join(out, f));

#!/usr/bin/env bash
# Build the web dashboard's bundle (served at /ui/): `npm ci` from src/ui/web's lockfile, then
# esbuild bundles our sources with xterm.js into OUTDIR (default ${CARGO_TARGET_DIR:-target}/ui,
# where the server looks by default: target/debug/sqlite-sim -> target/ui). Nothing is fetched
# at run time, so the page works offline. Skips the build when the sources are unchanged.
# Installs Debian's nodejs and npm when node is missing. Run by setup.sh.
# Usage: scripts/build-ui.sh [OUTDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out="${1:-${CARGO_TARGET_DIR:-target}/ui}"
case "$out" in /*) ;; *) out="$root/$out" ;; esac
web=src/ui/web

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "build-ui: installing nodejs npm"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        nodejs npm >/dev/null
fi

# The key: every source file (not node_modules) and the node version.
key=$( (cd "$web" && find . -path ./node_modules -prune -o -type f -print | LC_ALL=C sort |
    xargs sha256sum; node --version) | sha256sum | cut -c1-16)
if [ -f "$out/index.html" ] && [ "$(cat "$out/.key" 2>/dev/null)" = "$key" ]; then
    echo "build-ui: $out up to date"
    exit 0
fi

# node_modules must match the lockfile exactly; reinstall only when the lockfile changed.
lock=$(sha256sum "$web/package-lock.json" | cut -c1-16)
if [ "$(cat "$web/node_modules/.lock-key" 2>/dev/null)" != "$lock" ]; then
    (cd "$web" && npm ci --no-audit --no-fund --loglevel=error)
    echo "$lock" >"$web/node_modules/.lock-key"
fi

# Built beside the output and renamed into place, so a running server never serves half a build.
tmp="$out.tmp.$$"
rm -rf "$tmp"
trap 'rm -rf "$tmp"' EXIT
(cd "$web" && node build.mjs "$tmp")
echo "$key" >"$tmp/.key"
rm -rf "$out.old"
[ -e "$out" ] && mv "$out" "$out.old"
mv "$tmp" "$out"
rm -rf "$out.old"
echo "build-ui: built $out ($(du -sh "$out" | cut -f1))"

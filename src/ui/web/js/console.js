// The live console of one request in an xterm.js terminal. Everything about the console lives
// in this module, so the page around it does not change when the transport does.
//
// Transport: the console WebSocket, GET /requests/{uuid}/console[?from=OFFSET], subprotocol
// `sqlite-sim.console` (plus `bearer.<token>` when the page has a token). Server → client:
// binary frames are console bytes from OFFSET; text frames are JSON `hello` {offset, status,
// typist}, `missed` {bytes, offset}, `typist` {who, you}, `status` {status}, `error` {message}.
// Client → server: binary frames are keystrokes (typed only while we are the typist), text
// `{"type":"take"}` / `{"type":"release"}`. A dropped socket reconnects from the last offset.
//
// Fallback: a server without the WebSocket refuses the upgrade before it opens; the console is
// then drawn from the log entries the request page already streams over SSE (feedLog), read
// only: boot, stdout, stderr (red), shutdown and typed input, in order.

import { Terminal } from '@xterm/xterm';
import { FitAddon } from '@xterm/addon-fit';
import { token } from './api.js';
import { FINAL, el, entryBytes } from './util.js';

const CONSOLE_TYPES = new Set(['boot', 'stdout', 'stderr', 'shutdown', 'input']);
const RECONNECT_MS = 1000;

/**
 * Mounts a console for `uuid` in `container`. `onChange()` is called whenever mode, typist or
 * connection changes, so the page can enable its attach button (see `state()`).
 */
export function createConsole(container, { uuid, onChange = () => {} }) {
  const term = new Terminal({
    convertEol: true,
    scrollback: 20000,
    fontSize: 13,
    rows: 24,
    cursorBlink: false,
    disableStdin: true,
    theme: { background: '#0b1020', foreground: '#d7dde8' },
  });
  const fit = new FitAddon();
  term.loadAddon(fit);
  const screen = el('div', { class: 'terminal', 'data-testid': 'console' });
  const line = el('div', { class: 'console-line muted', 'data-testid': 'console-mode' }, 'connecting…');
  container.append(screen, line);
  term.open(screen);
  const refit = () => {
    try {
      fit.fit();
    } catch {
      // Not laid out yet (hidden): the next resize fits it.
    }
  };
  refit();
  const resize = new ResizeObserver(refit);
  resize.observe(screen);

  let mode = 'connecting'; // 'ws' | 'logs'
  let ws = null;
  let opened = false;
  let offset = 0;
  let final = false;
  let disposed = false;
  let typist = null;
  let you = false;
  let status = null; // the request's status as the socket last said
  let timer = null;
  let pending = []; // log entries received before the transport is decided
  const encoder = new TextEncoder();

  const changed = () => {
    const who = typist ? (you ? 'you are typing' : `${typist} is typing`) : 'nobody is typing';
    line.textContent = mode === 'ws'
      ? `live console · ${opened ? who : 'reconnecting…'}`
      : mode === 'logs'
        ? 'console from the log stream (read only: this server has no console WebSocket)'
        : 'connecting…';
    term.options.disableStdin = !(mode === 'ws' && you);
    screen.classList.toggle('typing', mode === 'ws' && you);
    onChange();
  };

  const writeEntry = (entry) => {
    if (!CONSOLE_TYPES.has(entry.log_type)) return;
    const bytes = entryBytes(entry);
    if (entry.log_type === 'stderr') term.write('\x1b[31m');
    term.write(bytes);
    if (entry.log_type === 'stderr') term.write('\x1b[0m');
  };

  const fallBack = () => {
    mode = 'logs';
    for (const e of pending) writeEntry(e);
    pending = [];
    changed();
  };

  const connect = () => {
    if (disposed) return;
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const q = offset ? `?from=${offset}` : '';
    const protocols = ['sqlite-sim.console'];
    const t = token();
    if (t) protocols.push(`bearer.${t}`);
    try {
      ws = new WebSocket(`${proto}//${location.host}/requests/${uuid}/console${q}`, protocols);
    } catch (e) {
      // A token that is not a valid subprotocol token, or a blocked URL: no socket at all.
      term.writeln(`\x1b[33m[console WebSocket unavailable: ${e.message}]\x1b[0m`);
      fallBack();
      return;
    }
    ws.binaryType = 'arraybuffer';
    let thisOpened = false;
    ws.onopen = () => {
      thisOpened = true;
      opened = true;
      if (mode !== 'ws') {
        mode = 'ws';
        pending = [];
      }
      changed();
    };
    ws.onmessage = (m) => {
      if (m.data instanceof ArrayBuffer) {
        const bytes = new Uint8Array(m.data);
        offset += bytes.length;
        term.write(bytes);
        return;
      }
      let msg;
      try {
        msg = JSON.parse(m.data);
      } catch {
        return;
      }
      switch (msg.type) {
        case 'hello':
          offset = msg.offset ?? offset;
          typist = msg.typist ?? null;
          you = false;
          status = msg.status ?? status;
          if (FINAL.has(msg.status)) final = true;
          break;
        case 'missed':
          term.write(`\r\n\x1b[33m[${msg.bytes} bytes not shown: this view fell behind; the logs below have them]\x1b[0m\r\n`);
          offset = msg.offset ?? offset;
          break;
        case 'typist':
          typist = msg.who ?? null;
          you = !!msg.you;
          break;
        case 'status':
          status = msg.status ?? status;
          if (FINAL.has(msg.status)) final = true;
          break;
        case 'error':
          term.write(`\r\n\x1b[31m[console: ${msg.message}]\x1b[0m\r\n`);
          break;
        default:
          break;
      }
      changed();
    };
    ws.onclose = () => {
      ws = null;
      you = false;
      typist = null;
      if (disposed) return;
      if (!thisOpened && mode === 'connecting') {
        fallBack();
        return;
      }
      opened = false;
      changed();
      if (final) {
        line.textContent = 'console closed: the request has ended';
        return;
      }
      timer = setTimeout(connect, RECONNECT_MS);
    };
  };

  term.onData((d) => {
    if (ws && you && ws.readyState === WebSocket.OPEN) ws.send(encoder.encode(d));
  });
  term.onBinary((d) => {
    if (!(ws && you && ws.readyState === WebSocket.OPEN)) return;
    const b = new Uint8Array(d.length);
    for (let i = 0; i < d.length; i++) b[i] = d.charCodeAt(i) & 0xff;
    ws.send(b);
  });

  connect();

  const send = (obj) => ws && ws.readyState === WebSocket.OPEN && ws.send(JSON.stringify(obj));

  return {
    /** A log entry from the page's SSE stream; drawn only in the fallback mode. */
    feedLog(entry) {
      if (mode === 'logs') writeEntry(entry);
      else if (mode === 'connecting') pending.push(entry);
    },
    /** The request reached a final status: no reconnecting after the socket closes. */
    ended() {
      final = true;
    },
    /** Become the typist (the server tells the other viewers). */
    take() {
      send({ type: 'take' });
      term.focus();
    },
    release() {
      send({ type: 'release' });
    },
    state() {
      return { mode, connected: opened && !!ws, typist, you, status };
    },
    dispose() {
      disposed = true;
      clearTimeout(timer);
      resize.disconnect();
      if (ws) ws.close();
      term.dispose();
    },
  };
}

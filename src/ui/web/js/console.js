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
// The commands' output may not be on the serial console at all: with the virtio channel
// (`"channel": "virtio"`) stdout and stderr travel on their own ports, and the stream holds
// only boot, shutdown and anything typed. So for a request still running when the page opened,
// stdout/stderr log entries from the page's SSE are drawn too, once the socket's backlog has
// been drawn (so they land after the boot text, where they belong). For a request that had
// already ended, the stream alone is shown; the logs below hold the output.
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
  let channel = null; // the request's `channel`
  let finalAtOpen = null;
  let drained = false; // the socket's first burst (the backlog) has been drawn
  let quiet = null;
  let channelQueue = []; // channel output waiting for the backlog
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
    channelQueue = [];
    changed();
  };

  const isOutput = (e) => e.log_type === 'stdout' || e.log_type === 'stderr';
  // A request's `channel` may stay null until it ends; while it is unknown the output is taken
  // to travel on the channel (the shipped guests' way), and once it is known to be the console
  // the output is left to the stream, which then holds it.
  const flushChannel = () => {
    if (mode !== 'ws' || !drained) return;
    if ((channel ?? 'virtio') === 'virtio') for (const e of channelQueue) writeEntry(e);
    channelQueue = [];
  };
  // The backlog is drawn once the socket has been quiet for a moment.
  const settle = () => {
    if (drained) return;
    clearTimeout(quiet);
    quiet = setTimeout(() => {
      drained = true;
      flushChannel();
    }, 150);
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
        settle();
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
          settle();
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
    /** The request as the page last read it (its channel, whether it had ended). */
    setRequest(r) {
      // No `channel` field at all: a server whose output is always on the console.
      channel = 'channel' in r ? r.channel : 'console';
      if (finalAtOpen === null) finalAtOpen = FINAL.has(r.status);
      flushChannel();
    },
    /**
     * A log entry from the page's SSE stream: all of the console in the fallback mode, the
     * channel's output next to the socket's stream otherwise.
     */
    feedLog(entry) {
      if (mode === 'logs') {
        writeEntry(entry);
        return;
      }
      if (mode === 'connecting') pending.push(entry);
      if (isOutput(entry) && !finalAtOpen) {
        channelQueue.push(entry);
        flushChannel();
      }
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
      clearTimeout(quiet);
      resize.disconnect();
      if (ws) ws.close();
      term.dispose();
    },
  };
}

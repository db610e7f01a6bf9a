// DOM building without innerHTML (every value from the API is text, never markup), formatting,
// and the request state machine as src/model.rs defines it.

/** el('div', {class: 'x', onclick: f}, child, 'text', …) */
export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') e.addEventListener(k.slice(2), v);
    else if (k === 'class') e.className = v;
    else if (k === 'dataset') Object.assign(e.dataset, v);
    else if (v === true) e.setAttribute(k, '');
    else e.setAttribute(k, String(v));
  }
  append(e, children);
  return e;
}

function append(e, children) {
  for (const c of children.flat(Infinity)) {
    if (c == null || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export function clear(e, ...children) {
  e.replaceChildren();
  append(e, children);
  return e;
}

export const STATUSES = ['pending', 'acknowledged', 'running', 'hold', 'done', 'failed', 'cancelled'];
export const FINAL = new Set(['done', 'failed', 'cancelled']);

/** Which controls the state machine (src/model.rs `transition`) allows for this request. */
export function allowed(r) {
  const final = FINAL.has(r.status);
  const cancelling = r.desired_status === 'cancelled';
  const kept = !!r.kept_until && !final;
  return {
    hold: !cancelling && ['pending', 'acknowledged', 'running'].includes(r.status),
    resume: !cancelling && r.status === 'hold',
    cancel: !final && !cancelling,
    release: kept && !cancelling,
    delete: true,
    // As `cli resume`: a request held before it got a VM is queued again, a paused VM continues.
    resumeTarget: r.agent_id ? 'running' : 'pending',
  };
}

export function badge(status, desired) {
  return el(
    'span',
    { class: `badge s-${status}`, dataset: { status } },
    status,
    desired && desired !== status ? el('small', {}, ` → ${desired}`) : null,
  );
}

export function shortId(uuid) {
  return uuid.slice(0, 8);
}

export function fmtTime(ts) {
  if (!ts) return '–';
  const d = new Date(ts);
  return Number.isNaN(d.getTime()) ? ts : d.toLocaleString();
}

export function fmtMs(ms) {
  if (ms == null) return '–';
  return ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(ms < 10_000 ? 2 : 1)} s`;
}

export function fmtSecs(s) {
  return s == null ? '–' : fmtMs(Math.round(s * 1000));
}

export function fmtBytes(n) {
  if (n == null) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function ago(ts) {
  if (!ts) return '';
  const s = Math.max(0, (Date.now() - new Date(ts).getTime()) / 1000);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

/** Shows an error (an ApiError or any Error) in a container, replacing what was there. */
export function showError(container, err) {
  clear(container, el('p', { class: 'error', role: 'alert' }, err?.message || String(err)));
}

/** Decodes a log entry's exact bytes (output_base64 when the text is not valid UTF-8). */
export function entryBytes(entry) {
  if (entry.output_base64) {
    const bin = atob(entry.output_base64);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }
  return new TextEncoder().encode(entry.output);
}

// The REST API as the CLI uses it: JSON calls with the bearer token, the SSE log stream read
// through fetch (EventSource cannot send an Authorization header), and what the server's own
// OpenAPI document says it supports (so the page adapts to a server without a feature).

const TOKEN_KEY = 'sqlite-sim.token';

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(t) {
  if (t) sessionStorage.setItem(TOKEN_KEY, t);
  else sessionStorage.removeItem(TOKEN_KEY);
}

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message || `HTTP ${status}`);
    this.status = status;
    this.code = code;
  }
}

/** Handlers run when the server answers 401, so the shell can ask for a token. */
const unauthorizedHandlers = new Set();
export function onUnauthorized(fn) {
  unauthorizedHandlers.add(fn);
}

function headers(extra = {}) {
  const h = { ...extra };
  const t = token();
  if (t) h.Authorization = `Bearer ${t}`;
  return h;
}

async function failure(resp) {
  let code = 'http_error';
  let message = `${resp.status} ${resp.statusText}`;
  try {
    const body = await resp.json();
    if (body && body.error) {
      code = body.error.code;
      message = body.error.message;
    }
  } catch {
    // Not the API's error shape (a proxy's page): keep the status line.
  }
  if (resp.status === 401) for (const fn of unauthorizedHandlers) fn();
  return new ApiError(resp.status, code, message);
}

/** A JSON call; resolves to the body (null for 204), rejects with ApiError. */
export async function call(method, path, body, { signal } = {}) {
  const init = { method, headers: headers(), signal };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  if (!resp.ok) throw await failure(resp);
  if (resp.status === 204) return null;
  const text = await resp.text();
  return text ? JSON.parse(text) : null;
}

export const get = (path, opts) => call('GET', path, undefined, opts);

/** POSTs a multipart form (the browser sets its boundary); resolves to the JSON answer. */
export async function postForm(path, form) {
  const resp = await fetch(path, { method: 'POST', headers: headers(), body: form });
  if (!resp.ok) throw await failure(resp);
  return resp.json();
}

/** Fetches a binary answer (raw logs, artifacts) with the token and saves it as `name`. */
export async function download(path, name) {
  const resp = await fetch(path, { headers: headers() });
  if (!resp.ok) throw await failure(resp);
  const url = URL.createObjectURL(await resp.blob());
  const a = document.createElement('a');
  a.href = url;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

/**
 * Reads a Server-Sent Events stream, calling onEvent({event, id, data}) per event. Resolves when
 * the server ends the stream; rejects on a network error or an error answer. `lastEventId`
 * resumes without gaps (the API honours Last-Event-ID).
 */
export async function sse(path, onEvent, { signal, lastEventId } = {}) {
  const h = headers({ Accept: 'text/event-stream' });
  if (lastEventId != null) h['Last-Event-ID'] = String(lastEventId);
  const resp = await fetch(path, { headers: h, signal, cache: 'no-store' });
  if (!resp.ok) throw await failure(resp);
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  let ev = { event: 'message', id: null, data: [] };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let nl;
    while ((nl = buf.indexOf('\n')) >= 0) {
      let line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      if (line.endsWith('\r')) line = line.slice(0, -1);
      if (line === '') {
        if (ev.data.length) onEvent({ event: ev.event, id: ev.id, data: ev.data.join('\n') });
        ev = { event: 'message', id: null, data: [] };
        continue;
      }
      if (line.startsWith(':')) continue;
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      let val = colon < 0 ? '' : line.slice(colon + 1);
      if (val.startsWith(' ')) val = val.slice(1);
      if (field === 'event') ev.event = val;
      else if (field === 'data') ev.data.push(val);
      else if (field === 'id') ev.id = val;
    }
  }
}

let features = null;

/**
 * What this server offers, read once from /openapi.json: the submission's fields (so
 * keep_on_failure and files appear only where the server takes them) and its paths.
 */
export async function serverFeatures() {
  if (features) return features;
  const doc = await get('/openapi.json');
  const resolve = (s) => {
    while (s && s.$ref) s = s.$ref.split('/').slice(1).reduce((o, k) => o && o[k], doc);
    return s;
  };
  const post = doc.paths?.['/requests']?.post;
  const content = post?.requestBody?.content || {};
  const schema = resolve(content['application/json']?.schema) || {};
  const fields = new Set(Object.keys(schema.properties || {}));
  features = {
    fields,
    multipart: 'multipart/form-data' in content,
    paths: new Set(Object.keys(doc.paths || {})),
    maxTimeout: resolve(schema.properties?.timeout)?.maximum ?? null,
  };
  return features;
}

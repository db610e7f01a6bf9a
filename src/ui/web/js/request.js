// One request: metadata and timings, the controls the state machine allows, the live console
// (console.js), the logs by type and the artifacts. Live through the SSE log stream, whose
// `status` events carry the whole request and whose `log` events fill the logs (and the
// console, when it has no WebSocket).

import { ApiError, call, download, get, serverFeatures, sse } from './api.js';
import { createConsole } from './console.js';
import { FINAL, allowed, badge, clear, el, fmtBytes, fmtMs, fmtTime, showError } from './util.js';

const LOG_TYPES = ['boot', 'command', 'stdout', 'stderr', 'shutdown', 'system', 'input'];
const RECONNECT_MS = 1000;

export function mountRequest(root, { uuid }) {
  const head = el('div', { class: 'title-row' });
  const notice = el('div', { class: 'form-status', 'data-testid': 'action-status' });
  const actions = el('div', { class: 'actions controls', 'data-testid': 'controls' });
  const meta = el('dl', { class: 'meta', 'data-testid': 'meta' });
  const consoleBox = el('section', { class: 'console-box' });
  const logsBox = el('section', { class: 'logs-box' });
  const artifactsBox = el('section', { class: 'artifacts-box', 'data-testid': 'artifacts' });
  const attemptsBox = el('section', { class: 'attempts-box', 'data-testid': 'attempts' });
  const webhooksBox = el('section', { class: 'webhooks-box', 'data-testid': 'webhooks' });
  root.append(head, actions, notice,
    el('div', { class: 'columns' },
      el('div', { class: 'main-col' }, el('h2', {}, 'Console'), consoleBox, el('h2', {}, 'Logs'), logsBox),
      el('aside', {}, el('h2', {}, 'Details'), meta, attemptsBox, webhooksBox, artifactsBox)));

  let req = null;
  let deliveriesPending = false;
  let stopped = false;
  let lastId = null;
  let timer = null;
  const ctrl = new AbortController();
  // Per type: the text shown (entries, and a marker where a new attempt begins), the number
  // of entries, and the attempt of the last one.
  const logs = Object.fromEntries(LOG_TYPES.map((t) => [t, []]));
  const counts = Object.fromEntries(LOG_TYPES.map((t) => [t, 0]));
  const lastAttempt = {};
  let tab = 'stdout';

  // Buttons, created once and enabled from the request's state.
  const btn = (label, testid, onclick, cls = '') =>
    el('button', { type: 'button', class: cls, 'data-testid': testid, onclick }, label);
  const control = async (target, verb) => {
    clear(notice, el('p', { class: 'muted' }, `${verb}…`));
    try {
      const r = await call('PUT', `/requests/${uuid}/status`, { status: target });
      update(r.request ?? r);
      clear(notice, el('p', { class: 'muted' }, r.applied === false ? `${verb}: recorded, the agent is applying it` : `${verb}: done`));
    } catch (e) {
      showError(notice, e);
    }
  };
  const buttons = {
    hold: btn('Hold', 'hold', () => control('hold', 'Hold')),
    resume: btn('Resume', 'resume', () => control(allowed(req).resumeTarget, 'Resume')),
    cancel: btn('Cancel', 'cancel', () => control('cancelled', 'Cancel'), 'danger'),
    release: btn('Release kept VM', 'release', () => control('release', 'Release')),
    attach: btn('Attach and type', 'attach', () => (con.state().you ? con.release() : con.take())),
    delete: btn('Delete', 'delete', async () => {
      if (!window.confirm('Delete this request and its logs? An active VM is shut down first.')) return;
      try {
        await call('DELETE', `/requests/${uuid}`);
        location.hash = '#/';
      } catch (e) {
        showError(notice, e);
      }
    }, 'danger'),
  };
  actions.append(...Object.values(buttons));

  const con = createConsole(consoleBox, { uuid, onChange: () => req && renderButtons() });

  const renderButtons = () => {
    const a = allowed(req);
    buttons.hold.disabled = !a.hold;
    buttons.resume.disabled = !a.resume;
    buttons.cancel.disabled = !a.cancel;
    buttons.release.hidden = !('kept_until' in req);
    buttons.release.disabled = !a.release;
    const c = con.state();
    // The socket's word on the status is the freshest; typing needs a running guest.
    buttons.attach.disabled = !(c.mode === 'ws' && c.connected && (c.status ?? req.status) === 'running');
    buttons.attach.title = c.mode === 'logs' ? 'needs the console WebSocket, which this server does not have' : '';
    buttons.attach.textContent = c.you ? 'Stop typing' : 'Attach and type';
  };

  const update = (r) => {
    req = r;
    con.setRequest(r);
    clear(head,
      el('h1', { class: 'mono' }, el('a', { href: '#/', class: 'muted' }, 'Requests / '), r.uuid),
      badge(r.status, r.desired_status));
    head.querySelector('.badge').dataset.testid = 'status';
    const rows = [
      ['VM', r.vm_name],
      ['Status', r.status + (r.desired_status ? ` (wanted: ${r.desired_status})` : '')],
      ['Priority', r.priority ?? 0, 'priority'],
      ['Queue position', r.queue_position ?? null, 'queue-position'],
      ['Waiting for', r.waiting_for ?? null, 'waiting-for'],
      ['Attempt', r.attempt == null ? null : `${r.attempt} of ${(r.retries ?? 0) + 1}`, 'attempt'],
      ['Submitted by', r.submitted_by ?? null, 'submitted-by'],
      ['Requires', r.requires?.length ? r.requires.join(', ') : null],
      ['Exit code', r.exit_code ?? '–', 'exit-code'],
      ['Error', r.error ?? '–', 'error'],
      ['Kept until', 'kept_until' in r ? fmtTime(r.kept_until) : null],
      ['Timeout', `${r.timeout} s`],
      ['Boot', [r.boot ?? 'default', r.boot_mode ? ` → ${r.boot_mode}` : ''].join('')],
      ['Created', fmtTime(r.created_at)],
      ['Started', fmtTime(r.started_at)],
      ['Finished', fmtTime(r.finished_at)],
      ['Boot time', fmtMs(r.boot_ms)],
      ['Restore time', r.restore_ms == null ? null : fmtMs(r.restore_ms)],
      ['Run time', fmtMs(r.run_ms)],
      ['Shutdown', r.shutdown_ms == null ? '–' : `${fmtMs(r.shutdown_ms)} (${r.shutdown_step})`],
      ['Agent', r.agent_id ?? '–'],
      ['Host', r.host ?? null],
      ['Channel', r.channel ?? null],
    ].filter(([, v]) => v != null);
    clear(meta, rows.map(([k, v, id]) => [el('dt', {}, k), el('dd', id ? { 'data-testid': id } : {}, String(v))]));
    renderAttempts(attemptsBox, r.attempts ?? []);
    // Only GET /requests/{uuid} carries the deliveries; the stream's status events do not.
    if (Array.isArray(r.webhooks)) {
      renderWebhooks(webhooksBox, r.webhooks);
      deliveriesPending = r.webhooks.some((d) => d.state === 'pending');
    }
    renderButtons();
    if (FINAL.has(r.status)) {
      con.ended();
      loadArtifacts();
    }
  };

  // Logs by type: tabs with counts, the selected type's text, a raw download.
  const tabs = el('div', { class: 'tabs', role: 'tablist' });
  const pre = el('pre', { class: 'log', 'data-testid': 'log-text' });
  const rawBtn = el('button', { type: 'button', class: 'link', 'data-testid': 'download-raw' }, 'download raw');
  rawBtn.addEventListener('click', () =>
    download(`/requests/${uuid}/logs/raw?log_type=${tab}`, `${uuid.slice(0, 8)}-${tab}.bin`).catch((e) => showError(notice, e)));
  logsBox.append(tabs, el('div', { class: 'log-tools' }, rawBtn), pre);
  const renderTabs = () => {
    clear(tabs, LOG_TYPES.filter((t) => logs[t].length || t === 'stdout').map((t) =>
      el('button', {
        type: 'button', role: 'tab', class: t === tab ? 'tab active' : 'tab', 'aria-selected': String(t === tab),
        'data-testid': `tab-${t}`,
        onclick: () => {
          tab = t;
          renderTabs();
          pre.textContent = logs[t].join('');
        },
      }, t, el('small', {}, ` ${counts[t]}`))));
    rawBtn.hidden = !['stdout', 'stderr', 'boot', 'shutdown', 'command', 'input', 'system'].includes(tab);
  };
  renderTabs();

  const onLog = (entry) => {
    const t = entry.log_type;
    const list = logs[t];
    if (!list) return;
    const isNew = counts[t] === 0;
    // A retried request's runs are told apart: nothing of one attempt runs into the next.
    const prev = lastAttempt[t];
    lastAttempt[t] = entry.attempt;
    const text = (prev != null && entry.attempt != null && entry.attempt !== prev ? attemptMarker(entry.attempt) : '') + entry.output;
    list.push(text);
    counts[t] += 1;
    if (t === tab) pre.append(text);
    if (isNew) renderTabs();
    else {
      const count = tabs.querySelector(`[data-testid="tab-${t}"] small`);
      if (count) count.textContent = ` ${counts[t]}`;
    }
    con.feedLog(entry);
    // Some changes come without a status event (a kept run stays `running` and gains
    // `kept_until`); each is logged as `system`, so re-read the request after one.
    if (entry.log_type === 'system') refetchSoon();
  };

  let refetchTimer = null;
  const refetch = () => get(`/requests/${uuid}`).then((r) => !stopped && update(r), () => {});
  const refetchSoon = () => {
    clearTimeout(refetchTimer);
    refetchTimer = setTimeout(refetch, 250);
  };
  // And a slow re-read while it is active, in case the log came before the row's change, or
  // while its webhooks are still being delivered.
  const poll = setInterval(() => req && (!FINAL.has(req.status) || deliveriesPending) && document.visibilityState !== 'hidden' && refetch(), 5000);

  // Artifacts, when this server has the endpoint (added with multipart uploads).
  let artifactsLoaded = false;
  const loadArtifacts = async () => {
    if (artifactsLoaded) return;
    artifactsLoaded = true;
    const f = await serverFeatures().catch(() => null);
    const listPath = f && [...f.paths].find((p) => p === '/requests/{uuid}/artifacts');
    if (!listPath) return;
    const filePath = [...f.paths].find((p) => p.startsWith('/requests/{uuid}/artifacts/'));
    try {
      const body = await get(`/requests/${uuid}/artifacts`);
      // [{path, size, sha256, mode, left_out}]: left_out says why a listed file has no bytes.
      const items = Array.isArray(body) ? body : body.artifacts || [];
      const tar = f.paths.has('/requests/{uuid}/artifacts.tar');
      const save = (url, name) => download(url, name).catch((e) => showError(notice, e));
      clear(artifactsBox, el('h2', {}, 'Artifacts'),
        items.length && tar ? el('button', {
          type: 'button', class: 'link', 'data-testid': 'artifacts-tar',
          onclick: () => save(`/requests/${uuid}/artifacts.tar`, `${uuid.slice(0, 8)}-artifacts.tar`),
        }, 'download all (.tar)') : null,
        items.length ? el('ul', { class: 'artifacts' }, items.map((a) => {
          const name = a.path ?? a.name ?? String(a);
          // The file route's parameter is the guest path without its leading slash.
          const url = filePath && !a.left_out
            ? `/requests/${uuid}/artifacts/${name.split('/').filter(Boolean).map(encodeURIComponent).join('/')}`
            : null;
          return el('li', {}, el('span', { class: 'mono' }, name),
            a.size != null ? el('small', { class: 'muted' }, ` ${fmtBytes(a.size)} `) : ' ',
            a.left_out ? el('small', { class: 'error' }, `left out: ${a.left_out}`) : null,
            url ? el('button', { type: 'button', class: 'link', onclick: () => save(url, name.split('/').pop()) }, 'download') : null);
        })) : el('p', { class: 'muted' }, 'No artifacts.'));
    } catch (e) {
      if (!(e instanceof ApiError && e.status === 404)) showError(artifactsBox, e);
    }
  };

  // The stream: `status` events update everything, `log` events fill the logs, `end` ends it.
  const follow = async () => {
    let ended = false;
    try {
      await sse(`/requests/${uuid}/logs/stream`, (ev) => {
        if (ev.event === 'status') update(JSON.parse(ev.data));
        else if (ev.event === 'log') {
          lastId = ev.id;
          onLog(JSON.parse(ev.data));
        } else if (ev.event === 'end') ended = true;
      }, { signal: ctrl.signal, lastEventId: lastId });
    } catch (e) {
      if (stopped) return;
      if (e instanceof ApiError && e.status === 404) {
        clear(root, el('h1', {}, 'Request not found'), el('p', {}, el('a', { href: '#/' }, 'Back to the requests')));
        return;
      }
      if (e instanceof ApiError && e.status === 401) return;
    }
    if (stopped) return;
    if (ended) {
      // The last status event may precede the final logs' commit by nothing; read it once more.
      get(`/requests/${uuid}`).then(update, () => {});
      return;
    }
    timer = setTimeout(follow, RECONNECT_MS);
  };

  get(`/requests/${uuid}`).then((r) => {
    update(r);
    follow();
  }, (e) => {
    if (e instanceof ApiError && e.status === 404) {
      clear(root, el('h1', {}, 'Request not found'), el('p', {}, el('a', { href: '#/' }, 'Back to the requests')));
    } else showError(root, e);
  });

  return () => {
    stopped = true;
    ctrl.abort();
    clearTimeout(timer);
    clearTimeout(refetchTimer);
    clearInterval(poll);
    con.dispose();
  };
}

function attemptMarker(n) {
  return `\n──── attempt ${n} ────\n`;
}

/** Earlier attempts, each failed for an infrastructure reason and re-queued. */
function renderAttempts(box, attempts) {
  clear(box, attempts.length ? [el('h2', {}, 'Earlier attempts'), el('ul', { class: 'attempts' }, attempts.map((a) =>
    el('li', { 'data-testid': `attempt-${a.attempt}` }, el('b', {}, `#${a.attempt}`), ` ${a.error}`,
      el('small', { class: 'muted' }, ` ${[a.host, fmtTime(a.finished_at)].filter(Boolean).join(' · ')}`))))] : []);
}

/** Webhook deliveries: where each went and how it fared. */
function renderWebhooks(box, deliveries) {
  clear(box, deliveries.length ? [el('h2', {}, 'Webhooks'), el('ul', { class: 'webhooks' }, deliveries.map((d) => {
    const last = d.last_status != null ? `HTTP ${d.last_status}` : d.last_error;
    const when = d.state === 'delivered' ? fmtTime(d.delivered_at) : d.next_attempt_at ? `next ${fmtTime(d.next_attempt_at)}` : null;
    return el('li', { 'data-testid': 'delivery', 'data-state': d.state },
      el('span', { class: `badge s-${d.state === 'delivered' ? 'done' : d.state === 'pending' ? 'pending' : 'failed'}` }, d.state),
      ` ${d.event} → `, el('span', { class: 'mono' }, d.url),
      el('small', { class: 'muted' }, ` ${[`${d.attempts} attempt${d.attempts === 1 ? '' : 's'}`, last, when].filter(Boolean).join(' · ')}`));
  }))] : []);
}

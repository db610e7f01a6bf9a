// The requests list: /stats figures on top, filters by status and VM, paging. Live by polling
// the same GET /requests page the filters describe (one small query, re-rendered only when its
// answer changes); polling pauses while the tab is hidden.

import { get } from './api.js';
import { STATUSES, ago, badge, clear, el, fmtBytes, fmtMs, shortId, showError } from './util.js';

const PAGE = 25;
const POLL_MS = 1500;

export function mountRequests(root, { params }) {
  const status = (params.get('status') || '').split(',').filter(Boolean);
  const vm = params.get('vm') || '';
  const page = Math.max(0, parseInt(params.get('page') || '0', 10) || 0);

  const stats = el('section', { class: 'stats', 'data-testid': 'stats' });
  const filters = el('form', { class: 'filters', 'data-testid': 'filters' });
  const table = el('div', { class: 'table-wrap' });
  const pager = el('div', { class: 'pager' });
  const live = el('span', { class: 'live muted', 'data-testid': 'live' }, '');
  root.append(
    el('div', { class: 'title-row' }, el('h1', {}, 'Requests'), live,
      el('a', { class: 'button primary', href: '#/submit' }, 'New request')),
    stats, filters, table, pager,
  );

  const go = (next) => {
    const q = new URLSearchParams();
    const s = next.status ?? status;
    if (s.length) q.set('status', s.join(','));
    if (next.vm ?? vm) q.set('vm', next.vm ?? vm);
    const p = next.page ?? 0;
    if (p) q.set('page', String(p));
    const qs = q.toString();
    location.hash = `#/${qs ? `?${qs}` : ''}`;
  };

  // Filters: one checkbox per status, and the VMs the server knows.
  const vmSelect = el('select', { name: 'vm', 'data-testid': 'filter-vm' }, el('option', { value: '' }, 'all VMs'));
  if (vm) vmSelect.append(el('option', { value: vm, selected: true }, vm));
  get('/vms').then((list) => {
    for (const v of list.vms) {
      if (v.name !== vm) vmSelect.append(el('option', { value: v.name }, v.name));
    }
  }, () => {});
  vmSelect.addEventListener('change', () => go({ vm: vmSelect.value }));
  const boxes = STATUSES.map((s) => {
    const box = el('input', { type: 'checkbox', value: s, checked: status.includes(s), 'data-testid': `filter-${s}` });
    box.addEventListener('change', () =>
      go({ status: STATUSES.filter((x) => filters.querySelector(`input[value="${x}"]`).checked) }));
    return el('label', { class: 'check' }, box, s);
  });
  clear(filters, el('span', { class: 'muted' }, 'Status:'), boxes, el('span', { class: 'muted' }, 'VM:'), vmSelect,
    (status.length || vm) ? el('a', { href: '#/', class: 'clear-filters' }, 'clear filters') : null);
  filters.addEventListener('submit', (e) => e.preventDefault());

  let lastList = '';
  let lastStats = '';
  let timer = null;
  let stopped = false;
  const ctrl = new AbortController();

  const renderStats = (s) => {
    const counts = STATUSES.map((k) =>
      el('a', { class: `count s-${k}`, href: `#/?status=${k}`, 'data-testid': `count-${k}` },
        el('b', {}, String(s.by_status[k] ?? 0)), ` ${k}`));
    clear(stats,
      el('div', { class: 'counts' }, counts),
      el('dl', { class: 'figures' },
        fig('VMs running', s.vms_running, 'vms-running'),
        fig('Success rate', s.success_rate == null ? '–' : `${(s.success_rate * 100).toFixed(1)} %`),
        fig('Boot mean / p95', `${fmtMs(round(s.boot.mean_ms))} / ${fmtMs(s.boot.p95_ms)}`),
        fig('Run mean / p95', `${fmtMs(round(s.run.mean_ms))} / ${fmtMs(s.run.p95_ms)}`),
        fig('Log volume', fmtBytes(s.log_bytes))));
  };

  const renderList = (list) => {
    if (!list.requests.length) {
      clear(table, el('p', { class: 'muted empty' }, list.total ? 'No requests on this page.' : 'No requests match.'));
    } else {
      clear(table, el('table', { class: 'requests', 'data-testid': 'requests-table' },
        el('thead', {}, el('tr', {}, ['Request', 'VM', 'Status', 'Priority', 'Exit', 'Created', 'Boot', 'Run', 'Commands'].map((h) => el('th', {}, h)))),
        el('tbody', {}, list.requests.map((r) =>
          el('tr', { 'data-uuid': r.uuid },
            el('td', {}, el('a', { href: `#/requests/${r.uuid}`, class: 'mono' }, shortId(r.uuid))),
            el('td', {}, r.vm_name),
            el('td', { class: 'status-cell' }, badge(r.status, r.desired_status),
              r.queue_position != null ? el('small', { class: 'muted', title: 'queue position', 'data-testid': 'queue-position' }, ` #${r.queue_position}`) : null,
              r.attempt > 1 ? el('small', { class: 'muted', title: 'attempt' }, ` attempt ${r.attempt}`) : null),
            el('td', { class: 'mono' }, r.priority ? String(r.priority) : ''),
            el('td', { class: 'mono' }, r.exit_code ?? (r.error ? '!' : '')),
            el('td', { title: r.created_at }, ago(r.created_at)),
            el('td', {}, fmtMs(r.boot_ms)),
            el('td', {}, fmtMs(r.run_ms)),
            el('td', { class: 'mono cmd', title: r.commands }, firstLine(r.commands)))))));
    }
    const last = Math.max(0, Math.ceil(list.total / PAGE) - 1);
    clear(pager,
      el('button', { type: 'button', disabled: page === 0, onclick: () => go({ page: page - 1 }), 'data-testid': 'prev' }, '← Newer'),
      el('span', { class: 'muted' }, list.total
        ? `${list.offset + 1}–${list.offset + list.requests.length} of ${list.total}` : '0 requests'),
      el('button', { type: 'button', disabled: page >= last, onclick: () => go({ page: page + 1 }), 'data-testid': 'next' }, 'Older →'));
  };

  const q = new URLSearchParams({ limit: String(PAGE), offset: String(page * PAGE) });
  if (status.length) q.set('status', status.join(','));
  if (vm) q.set('vm_name', vm);

  const tick = async () => {
    if (stopped) return;
    if (document.visibilityState !== 'hidden') {
      try {
        const list = await get(`/requests?${q}`, { signal: ctrl.signal });
        const key = JSON.stringify(list);
        if (key !== lastList) {
          lastList = key;
          renderList(list);
        }
        const s = await get('/stats', { signal: ctrl.signal });
        const sk = JSON.stringify(s);
        if (sk !== lastStats) {
          lastStats = sk;
          renderStats(s);
        }
        live.textContent = `live · updated ${new Date().toLocaleTimeString()}`;
      } catch (e) {
        if (stopped) return;
        if (e.status !== 401) showError(table, e);
        live.textContent = 'not updating';
      }
    }
    timer = setTimeout(tick, POLL_MS);
  };
  tick();

  return () => {
    stopped = true;
    ctrl.abort();
    clearTimeout(timer);
  };
}

function fig(label, value, testid) {
  return el('div', {}, el('dt', {}, label), el('dd', testid ? { 'data-testid': testid } : {}, String(value)));
}

function round(x) {
  return x == null ? null : Math.round(x);
}

function firstLine(s) {
  const line = s.split('\n').find((l) => l.trim()) || '';
  return line.length > 60 ? `${line.slice(0, 60)}…` : line;
}

// The VM catalogue (GET /vms): config, accelerator and template state per VM, with the
// template orders `cli template build|delete` gives. Polled while shown, since builds move.

import { call, get } from './api.js';
import { clear, el, fmtBytes, fmtMs, fmtTime, showError } from './util.js';

const POLL_MS = 3000;

export function mountVms(root) {
  const notice = el('div', { class: 'form-status', 'data-testid': 'vms-status' });
  const body = el('div', { class: 'table-wrap' }, el('p', { class: 'muted' }, 'Loading…'));
  root.append(el('h1', {}, 'VMs'), notice, body);
  let stopped = false;
  let timer = null;
  let last = '';

  const order = async (name, method, verb) => {
    if (method === 'DELETE' && !window.confirm(`Delete the template of ${name} on every host?`)) return;
    clear(notice, el('p', { class: 'muted' }, `${verb} ${name}…`));
    try {
      await call(method, `/vms/${encodeURIComponent(name)}/template`);
      clear(notice, el('p', { class: 'muted' }, `${verb} ${name}: ordered; every host's agents carry it out.`));
      last = '';
      refresh();
    } catch (e) {
      showError(notice, e);
    }
  };

  const render = (vms) => {
    if (!vms.length) {
      clear(body, el('p', { class: 'muted empty' }, 'No VMs: add NAME.conf to vm_configs/ or NAME.qcow2 to vm_images/.'));
      return;
    }
    clear(body, el('table', { class: 'vms', 'data-testid': 'vms-table' },
      el('thead', {}, el('tr', {}, ['VM', 'Config', 'Accelerator', 'Template', 'Restores', ''].map((h) => el('th', {}, h)))),
      el('tbody', {}, vms.map((v) => {
        const c = v.config;
        const t = v.template;
        const hosts = t?.hosts || [];
        return el('tr', { 'data-vm': v.name },
          el('td', {}, el('b', {}, v.name), v.valid ? null : el('div', { class: 'error' }, v.error)),
          el('td', { class: 'small' }, c ? `${c.memory}, ${c.cpus} CPU, ${c.format}${c.warm ? ', warm' : ''}${c.warm_pool ? `, pool ${c.warm_pool}` : ''}` : '–'),
          el('td', { class: 'small' }, v.accelerator ?? '–'),
          el('td', { 'data-testid': 'template-state' },
            t ? el('span', { class: `badge t-${t.state}` }, t.state) : '–',
            t?.orders?.outstanding ? el('small', { class: 'muted' }, ' order outstanding') : null,
            hosts.map((h) => el('div', { class: 'small muted' },
              `${h.host_id}: ${h.state}`,
              h.size_bytes ? `, ${fmtBytes(h.size_bytes)}` : '',
              h.build_ms ? `, built in ${fmtMs(h.build_ms)}` : '',
              h.built_at ? ` (${fmtTime(h.built_at)})` : '',
              h.error ? el('div', { class: 'error' }, h.error) : null))),
          el('td', { class: 'small' }, t?.restores ? `${t.restores} · p50 ${fmtMs(t.restore_p50_ms)} · p99 ${fmtMs(t.restore_p99_ms)}` : '–'),
          el('td', { class: 'actions' },
            el('button', {
              type: 'button', 'data-testid': `rebuild-${v.name}`, disabled: !(v.valid && c?.warm),
              title: c?.warm ? '' : 'only VMs with WARM="on" have a template',
              onclick: () => order(v.name, 'POST', 'Rebuild template of'),
            }, 'Rebuild template'),
            el('button', {
              type: 'button', class: 'danger', 'data-testid': `delete-template-${v.name}`, disabled: !hosts.length,
              onclick: () => order(v.name, 'DELETE', 'Delete template of'),
            }, 'Delete template')));
      }))));
  };

  const refresh = async () => {
    if (stopped) return;
    clearTimeout(timer);
    try {
      const list = await get('/vms');
      const key = JSON.stringify(list);
      if (key !== last) {
        last = key;
        render(list.vms);
      }
    } catch (e) {
      if (e.status !== 401) showError(body, e);
    }
    if (!stopped) timer = setTimeout(refresh, POLL_MS);
  };
  refresh();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

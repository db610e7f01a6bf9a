// The submit form: POST /requests with the body the CLI's `submit` sends. Optional fields
// (boot, keep_on_failure, files, artifacts, priority, retries, callback_url) appear when this server's OpenAPI document lists
// them, so the page never sends a field the server would refuse as unknown. Files go as
// multipart `file` parts (filename = guest destination) where the server takes multipart,
// else inline as base64 in the JSON.

import { call, get, postForm, serverFeatures } from './api.js';
import { clear, el, showError } from './util.js';

/** JSON bodies are at most 128 KiB (src/api/mod.rs BODY_LIMIT); inline files count in it. */
const BODY_LIMIT = 128 * 1024;

export function mountSubmit(root) {
  const status = el('div', { class: 'form-status', 'data-testid': 'submit-status' });
  const form = el('form', { class: 'submit', 'data-testid': 'submit-form' }, el('p', { class: 'muted' }, 'Loading VMs…'));
  root.append(el('h1', {}, 'New request'), form, status);
  Promise.all([get('/vms'), serverFeatures()]).then(([list, features]) => build(form, status, list.vms, features),
    (e) => showError(form, e));
}

function build(form, status, vms, features) {
  const usable = vms.filter((v) => v.valid);
  const vm = el('select', { name: 'vm_name', required: true, 'data-testid': 'vm' },
    usable.map((v) => el('option', { value: v.name }, v.name + (v.config?.warm ? ' (warm)' : ''))));
  const commands = el('textarea', {
    name: 'commands', rows: 8, required: true, spellcheck: 'false', class: 'mono', 'data-testid': 'commands',
    placeholder: 'echo Hello World && uname -a',
  });
  const timeout = el('input', {
    type: 'number', name: 'timeout', min: 1, max: features.maxTimeout, step: 1, placeholder: 'server default',
    'data-testid': 'timeout',
  });
  const rows = [
    row('VM', vm, usable.length ? null : 'No VM with a valid config: add one to vm_configs/.'),
    row('Commands', commands, 'A shell script; a #! first line picks its interpreter.'),
    row('Timeout (s)', timeout, features.maxTimeout ? `1–${features.maxTimeout}, counted from running.` : null),
  ];

  let boot = null;
  if (features.fields.has('boot')) {
    boot = el('select', { name: 'boot', 'data-testid': 'boot' },
      el('option', { value: '' }, "VM's default"), el('option', { value: 'cold' }, 'cold'),
      el('option', { value: 'warm' }, 'warm (from the template)'));
    rows.push(row('Boot', boot));
  }

  const keepSupported = features.fields.has('keep_on_failure');
  const keep = el('input', {
    type: 'number', name: 'keep_on_failure', min: 1, step: 1, placeholder: 'off',
    disabled: !keepSupported, 'data-testid': 'keep-on-failure',
  });
  rows.push(row('Keep on failure (s)', keep, keepSupported
    ? 'Keep the VM running this long after a failure, to attach to its console.'
    : 'This server does not support keep_on_failure yet.'));

  let files = null;
  let dir = null;
  if (features.fields.has('files')) {
    files = el('input', { type: 'file', multiple: true, name: 'files', 'data-testid': 'files' });
    dir = el('input', { type: 'text', name: 'dir', value: '/root', class: 'mono', 'data-testid': 'files-dir' });
    rows.push(row('Files', files, features.multipart
      ? 'Uploaded as multipart parts, up to the server\'s SQLITE_SIM_MAX_UPLOAD.'
      : 'Small files, sent inline (the whole submission at most 128 KiB).'));
    rows.push(row('…into guest directory', dir));
  }
  let artifacts = null;
  if (features.fields.has('artifacts')) {
    artifacts = el('input', { type: 'text', name: 'artifacts', class: 'mono', placeholder: '/root/out/*.log, /tmp/report.txt', 'data-testid': 'artifacts' });
    rows.push(row('Artifacts', artifacts, 'Guest paths or globs to collect after the commands, comma-separated.'));
  }

  // Queueing and delivery: each where the server's schema has it.
  const number = (name, testid, attrs) => el('input', { type: 'number', name, step: 1, 'data-testid': testid, ...attrs });
  const priority = features.fields.has('priority') ? number('priority', 'priority', { min: -100, max: 100, placeholder: '0' }) : null;
  if (priority) rows.push(row('Priority', priority, 'Higher runs first; above your role\'s allowance is refused.'));
  const retries = features.fields.has('retries') ? number('retries', 'retries', { min: 0, max: 10, placeholder: 'server default' }) : null;
  if (retries) rows.push(row('Retries', retries, 'Re-runs after infrastructure failures (never after the commands\' own).'));
  const callback = features.fields.has('callback_url')
    ? el('input', { type: 'url', name: 'callback_url', class: 'mono', placeholder: 'https://ci.example/hooks/sqlite-sim', 'data-testid': 'callback-url' })
    : null;
  if (callback) rows.push(row('Webhook URL', callback, 'POSTed the request when it ends; its host must be in SQLITE_SIM_WEBHOOK_ALLOW.'));

  const submit = el('button', { type: 'submit', class: 'primary', 'data-testid': 'submit' }, 'Submit');
  clear(form, rows, el('div', { class: 'actions' }, submit));

  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    submit.disabled = true;
    clear(status, el('p', { class: 'muted' }, 'Submitting…'));
    try {
      const body = { vm_name: vm.value, commands: commands.value };
      if (timeout.value) body.timeout = Number(timeout.value);
      if (boot && boot.value) body.boot = boot.value;
      if (keepSupported && keep.value) body.keep_on_failure = Number(keep.value);
      if (priority && priority.value) body.priority = Number(priority.value);
      if (retries && retries.value) body.retries = Number(retries.value);
      if (callback && callback.value.trim()) body.callback_url = callback.value.trim();
      if (artifacts && artifacts.value.trim()) {
        body.artifacts = artifacts.value.split(',').map((s) => s.trim()).filter(Boolean);
      }
      const picked = files ? [...files.files] : [];
      let created;
      if (picked.length && features.multipart) {
        const form = new FormData();
        form.append('request', new Blob([JSON.stringify(body)], { type: 'application/json' }));
        for (const f of picked) form.append('file', f, guestPath(dir.value, f.name));
        created = await postForm('/requests', form);
      } else {
        if (picked.length) body.files = await inlineFiles(picked, dir.value);
        if (new Blob([JSON.stringify(body)]).size > BODY_LIMIT) {
          throw new Error('The submission is over 128 KiB: send larger files with the CLI.');
        }
        created = await call('POST', '/requests', body);
      }
      location.hash = `#/requests/${created.uuid}`;
    } catch (err) {
      showError(status, err);
      submit.disabled = false;
    }
  });
}

function row(label, input, help) {
  return el('label', { class: 'row' }, el('span', { class: 'label' }, label), input,
    help ? el('small', { class: 'muted' }, help) : null);
}

function guestPath(dir, name) {
  return `${(dir || '/root').replace(/\/+$/, '')}/${name}`;
}

async function inlineFiles(list, dir) {
  const out = [];
  for (const f of list) {
    const bytes = new Uint8Array(await f.arrayBuffer());
    let bin = '';
    for (let i = 0; i < bytes.length; i += 0x8000) bin += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
    out.push({ path: guestPath(dir, f.name), content_base64: btoa(bin) });
  }
  return out;
}

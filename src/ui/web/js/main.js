// The dashboard's shell: hash routes to views, the token prompt, and the navigation. Each view
// is mount(container, params) → cleanup, so leaving a page stops its polling and streams.

import { onUnauthorized, setToken, token, get } from './api.js';
import { mountRequests } from './requests.js';
import { mountSubmit } from './submit.js';
import { mountRequest } from './request.js';
import { mountVms } from './vms.js';

const view = document.getElementById('view');
const dialog = document.getElementById('token-dialog');
const logout = document.getElementById('logout');
let cleanup = null;

function parseRoute() {
  const hash = location.hash.replace(/^#/, '') || '/';
  const [path, query = ''] = hash.split('?');
  const params = new URLSearchParams(query);
  const m = path.match(/^\/requests\/([0-9a-fA-F-]{36})$/);
  if (m) return { name: 'request', mount: mountRequest, params, uuid: m[1] };
  if (path === '/submit') return { name: 'submit', mount: mountSubmit, params };
  if (path === '/vms') return { name: 'vms', mount: mountVms, params };
  return { name: 'requests', mount: mountRequests, params };
}

function route() {
  if (cleanup) cleanup();
  cleanup = null;
  const r = parseRoute();
  for (const a of document.querySelectorAll('[data-nav]')) {
    a.classList.toggle('active', a.dataset.nav === r.name);
  }
  view.replaceChildren();
  view.dataset.view = r.name;
  cleanup = r.mount(view, r) || null;
}

let asking = false;
function askToken(message) {
  if (asking) return;
  asking = true;
  const err = document.getElementById('token-error');
  err.hidden = !message;
  err.textContent = message || '';
  document.getElementById('token-input').value = '';
  dialog.showModal();
}

document.getElementById('token-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const t = document.getElementById('token-input').value.trim();
  if (!t) return;
  setToken(t);
  asking = false;
  dialog.close();
  logout.hidden = false;
  // Check it at once, so a wrong token is said here rather than by every view.
  get('/stats').then(route, () => {});
});

// The prompt cannot be dismissed without a token: every view needs the API.
dialog.addEventListener('cancel', (e) => e.preventDefault());

onUnauthorized(() => {
  const had = token();
  setToken(null);
  logout.hidden = true;
  askToken(had ? 'That token was refused (401).' : null);
});

logout.addEventListener('click', () => {
  setToken(null);
  logout.hidden = true;
  location.reload();
});

logout.hidden = !token();
window.addEventListener('hashchange', route);
route();

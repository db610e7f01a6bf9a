// Browser tests of the dashboard: Debian's Chromium driven by playwright-core against a real
// server that tests/ui.rs started (real agents, the real tiny guest).
//
// Usage: node tests/ui/run.mjs BASE_URL OUTDIR SCENARIO...
//   UI_TOKEN=…  the server's SQLITE_SIM_API_TOKEN (the `token` scenario)
//   CHROMIUM=…  the browser (default /usr/bin/chromium)
// Screenshots of every page go to OUTDIR/<scenario>-<step>.png. Exit code 0 when every
// scenario passed; a failing scenario's screenshot is saved as OUTDIR/<scenario>-FAILED.png.

import { chromium } from 'playwright-core';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const [base, outDir, ...names] = process.argv.slice(2);
if (!base || !outDir || !names.length) {
  console.error('usage: node run.mjs BASE_URL OUTDIR SCENARIO...');
  process.exit(2);
}
mkdirSync(outDir, { recursive: true });

// Generous for TCG on a shared 2-core machine: a boot is ~3 s alone, much more under load.
const VM_TIMEOUT = 120_000;

/** Polls `probe` until it returns a truthy value; fails with `what` and the last value. */
async function until(what, probe, timeout = 30_000) {
  const start = Date.now();
  let last;
  for (;;) {
    try {
      last = await probe();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() - start > timeout) throw new Error(`timed out after ${timeout} ms waiting for ${what} (last: ${last})`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

const text = (page, sel) => page.locator(sel).first().innerText({ timeout: 2000 });
const statusOf = (page) => page.locator('[data-testid=status]').getAttribute('data-status', { timeout: 2000 });
const enabled = (page, id) => page.locator(`[data-testid=${id}]`).isEnabled({ timeout: 2000 });
const consoleText = (page) => text(page, '[data-testid=console] .xterm-rows');

async function waitStatus(page, want, timeout = VM_TIMEOUT) {
  const wanted = [].concat(want);
  return until(`status ${wanted.join('|')}`, async () => {
    const s = await statusOf(page);
    return wanted.includes(s) && s;
  }, timeout);
}

/** Submits `commands` from the form; returns the new request's uuid (the page goes there). */
async function submitForm(page, shot, commands, { timeout, keep, files, artifacts, priority, retries, callback } = {}) {
  await page.goto(`${base}/ui/#/submit`);
  await page.locator('[data-testid=vm]').selectOption('tiny');
  await page.locator('[data-testid=commands]').fill(commands);
  if (files) await page.locator('[data-testid=files]').setInputFiles(files);
  if (timeout) await page.locator('[data-testid=timeout]').fill(String(timeout));
  if (keep) await page.locator('[data-testid=keep-on-failure]').fill(String(keep));
  if (artifacts) await page.locator('[data-testid=artifacts]').fill(artifacts);
  if (priority != null) await page.locator('[data-testid=priority]').fill(String(priority));
  if (retries != null) await page.locator('[data-testid=retries]').fill(String(retries));
  if (callback) await page.locator('[data-testid=callback-url]').fill(callback);
  await shot('form');
  await page.locator('[data-testid=submit]').click();
  await page.waitForURL(/#\/requests\/[0-9a-f-]{36}$/, { timeout: 10_000 });
  return page.url().split('/').pop();
}

async function api(path, init = {}) {
  const headers = { ...(init.headers || {}) };
  if (process.env.UI_TOKEN) headers.Authorization = `Bearer ${process.env.UI_TOKEN}`;
  const r = await fetch(base + path, { ...init, headers });
  return r.json();
}

const scenarios = {
  /** The VMs page lists the catalogue with each VM's template state and order buttons. */
  async vms(page, shot) {
    await page.goto(`${base}/ui/#/vms`);
    await until('the tiny VM row', async () => (await page.locator('tr[data-vm=tiny]').count()) === 1);
    const row = await text(page, 'tr[data-vm=tiny]');
    if (!/128M/.test(row) || !/tcg/.test(row)) throw new Error(`tiny's row lacks its config: ${row}`);
    // The test server drops WARM from the configs: no template, so no rebuild either.
    if (await enabled(page, 'rebuild-tiny')) throw new Error('rebuild enabled for a VM without WARM');
    await shot('catalogue');
  },

  /**
   * A warm VM's template orders from the VMs page (the server has no agents, so an order stays
   * outstanding and nothing boots): rebuild is ordered and shows as outstanding.
   */
  async 'vms-order'(page, shot) {
    await page.goto(`${base}/ui/#/vms`);
    await until('rebuild enabled for the warm tiny', () => enabled(page, 'rebuild-tiny'));
    await page.locator('[data-testid=rebuild-tiny]').click();
    await until('ordered notice', async () => /ordered/.test(await text(page, '[data-testid=vms-status]')));
    await until('order outstanding', async () => /order outstanding/.test(await text(page, 'tr[data-vm=tiny]')));
    const vm = await api('/vms/tiny');
    if (!(vm.template.orders.build >= 1)) throw new Error(`no build order: ${JSON.stringify(vm.template.orders)}`);
    await shot('ordered');
  },

  /** Submit from the form; the output appears live in the console and the logs; done, 0. */
  async 'submit-live'(page, shot) {
    const uuid = await submitForm(page, shot, 'echo hello-ui\ncat /root/from-form.txt\nsleep 3\necho bye-$((6*7))', {
      files: [{ name: 'from-form.txt', mimeType: 'text/plain', buffer: Buffer.from('uploaded-by-the-form\n') }],
    });
    await until('hello-ui in the console', async () => /hello-ui/.test(await consoleText(page)), VM_TIMEOUT);
    // Live: the first line is on screen while the command still runs.
    const mid = await api(`/requests/${uuid}`);
    if (mid.status !== 'running') throw new Error(`expected running while sleeping, got ${mid.status}`);
    await shot('running');
    await waitStatus(page, 'done');
    await until('bye-42 in the console', async () => /bye-42/.test(await consoleText(page)));
    await until('exit code 0', async () => (await text(page, '[data-testid=exit-code]')) === '0');
    await page.locator('[data-testid=tab-stdout]').click();
    await until('stdout tab', async () =>
      /hello-ui\s+uploaded-by-the-form\s+bye-42/.test(await text(page, '[data-testid=log-text]')));
    // The raw download (fetched with the page's headers) is the stored bytes of that type.
    const [dl] = await Promise.all([page.waitForEvent('download'), page.locator('[data-testid=download-raw]').click()]);
    const raw = await readFile(await dl.path(), 'utf8');
    if (raw !== 'hello-ui\nuploaded-by-the-form\nbye-42\n') throw new Error(`raw stdout: ${JSON.stringify(raw)}`);
    for (const b of ['hold', 'resume', 'cancel']) {
      if (await enabled(page, b)) throw new Error(`${b} enabled on a done request`);
    }
    await shot('done');
    // The list shows it, with the counts on top.
    await page.goto(`${base}/ui/#/`);
    await until('the request in the list', async () => /done/.test(await text(page, `tr[data-uuid="${uuid}"]`)));
    await until('done count', async () => Number(await text(page, '[data-testid=count-done] b')) >= 1);
    await shot('list');
    // Filters: by status (checkboxes) and VM (the catalogue's names), kept in the URL.
    await page.locator('[data-testid=filter-failed]').click();
    await page.waitForURL(/status=failed/);
    await until('the done request filtered out', async () => /No requests match/.test(await text(page, 'main')));
    await page.goto(`${base}/ui/#/?status=done&vm=tiny`);
    await until('filtered list', async () => (await page.locator(`tr[data-uuid="${uuid}"]`).count()) === 1);
    if (!(await page.locator('[data-testid=filter-done]').isChecked())) throw new Error('done filter not shown checked');
    await shot('filtered');
  },

  /** Hold and resume from the buttons (status changes without reload), then cancel. */
  async 'hold-resume-cancel'(page, shot) {
    const uuid = await submitForm(page, shot, 'i=0; while [ $i -lt 300 ]; do i=$((i+1)); echo tick-$i; sleep 1; done');
    await until('ticks in the console', async () => /tick-2/.test(await consoleText(page)), VM_TIMEOUT);
    if (await enabled(page, 'resume')) throw new Error('resume enabled while running');
    // The list, open in a second tab, follows the status without a reload.
    const list = await page.context().newPage();
    await list.goto(`${base}/ui/#/`);
    await until('running in the list', async () => /running/.test(await text(list, `tr[data-uuid="${uuid}"]`)));
    await page.locator('[data-testid=hold]').click();
    await waitStatus(page, 'hold', 20_000);
    await until('resume enabled', () => enabled(page, 'resume'));
    if (await enabled(page, 'hold')) throw new Error('hold enabled while held');
    await until('hold in the list', async () => /hold/.test(await text(list, `tr[data-uuid="${uuid}"]`)));
    await shot('held');
    await list.screenshot({ path: join(outDir, 'hold-resume-cancel-list.png'), fullPage: true });
    await page.locator('[data-testid=resume]').click();
    await waitStatus(page, 'running', 20_000);
    const before = (await consoleText(page)).match(/tick-(\d+)/g)?.length ?? 0;
    await until('ticks again after resume', async () => ((await consoleText(page)).match(/tick-(\d+)/g)?.length ?? 0) > before);
    await shot('resumed');
    await page.locator('[data-testid=cancel]').click();
    await waitStatus(page, 'cancelled', 30_000);
    await until('list shows cancelled', async () => /cancelled/.test(await text(list, `tr[data-uuid="${uuid}"]`)));
    for (const b of ['hold', 'resume', 'cancel']) {
      if (await enabled(page, b)) throw new Error(`${b} enabled on a cancelled request`);
    }
    await shot('cancelled');
    // Delete from the page: back to the list, and the API no longer has it.
    page.once('dialog', (d) => d.accept());
    await page.locator('[data-testid=delete]').click();
    await page.waitForURL(/#\/$/, { timeout: 10_000 });
    const gone = await fetch(`${base}/requests/${uuid}`);
    if (gone.status !== 404) throw new Error(`deleted request still answers ${gone.status}`);
    await list.close();
  },

  /**
   * With SQLITE_SIM_API_TOKEN: the page asks for the token, refuses a wrong one, keeps the
   * right one in sessionStorage only, and every call (list, submit, stream, control) carries it.
   * The server runs without agents, so the request stays pending and no VM is needed.
   */
  async token(page, shot) {
    await page.goto(`${base}/ui/`);
    await page.locator('#token-dialog[open]').waitFor({ timeout: 10_000 });
    await shot('prompt');
    await page.locator('#token-input').fill('wrong-token');
    await page.locator('#token-submit').click();
    await until('refusal', async () => /refused/.test(await text(page, '#token-error')));
    await shot('refused');
    await page.locator('#token-input').fill(process.env.UI_TOKEN);
    await page.locator('#token-submit').click();
    await until('list loaded', async () => (await page.locator('[data-testid=count-pending]').count()) === 1);
    const stored = await page.evaluate(() => [sessionStorage.getItem('sqlite-sim.token'), localStorage.length]);
    if (stored[0] !== process.env.UI_TOKEN || stored[1] !== 0) throw new Error(`token storage: ${stored}`);
    await shot('list');
    const uuid = await submitForm(page, shot, 'echo never-runs');
    await waitStatus(page, 'pending', 10_000);
    await page.locator('[data-testid=hold]').click();
    await waitStatus(page, 'hold', 10_000);
    await page.locator('[data-testid=cancel]').click();
    await waitStatus(page, 'cancelled', 10_000);
    await shot('cancelled');
    const r = await api(`/requests/${uuid}`);
    if (r.status !== 'cancelled') throw new Error(`API says ${r.status}`);
  },

  /** Paging through more requests than a page holds (they stay pending: no agents here). */
  async paging(page, shot) {
    const before = (await api('/requests?limit=1')).total;
    for (let i = 0; i < 30; i++) {
      await api('/requests', {
        method: 'POST', headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ vm_name: 'tiny', commands: `echo page-${i}` }),
      });
    }
    const total = before + 30;
    await page.goto(`${base}/ui/#/?status=pending`);
    await until('first page', async () => (await text(page, '.pager')).includes(`1–25 of `));
    if (await enabled(page, 'prev')) throw new Error('newer enabled on the first page');
    if ((await page.locator('[data-testid=requests-table] tbody tr').count()) !== 25) throw new Error('not 25 rows');
    await page.locator('[data-testid=next]').click();
    await page.waitForURL(/page=1/);
    const pending = (await api('/requests?status=pending&limit=1')).total;
    await until('second page', async () => (await text(page, '.pager')).includes(`26–${pending} of ${pending}`));
    if (pending < 30 || total < pending) throw new Error(`counts: ${pending} pending of ${total}`);
    await until('newer enabled', () => enabled(page, 'prev'));
    await shot('second-page');
  },

  /**
   * Priority, retries and a webhook from the form (the server has no agents, so the request
   * waits): the page shows its priority, attempt and queue position, the list its place; once
   * cancelled, its webhook delivery to a closed port is listed with the failed attempt.
   * Runs after `paging`, whose requests wait at priority 0.
   */
  async 'queue-webhooks'(page, shot) {
    const hook = 'http://127.0.0.1:9/hook';
    const uuid = await submitForm(page, shot, 'echo queued', { priority: 7, retries: 2, callback: hook });
    await waitStatus(page, 'pending', 10_000);
    const r = await api(`/requests/${uuid}`);
    if (r.priority !== 7 || r.retries !== 2 || r.callback_url !== hook) throw new Error(`as stored: ${JSON.stringify(r)}`);
    if (r.queue_position !== 1) throw new Error(`queue position ${r.queue_position}, want 1 (above priority 0)`);
    await until('priority shown', async () => (await text(page, '[data-testid=priority]')) === '7');
    await until('attempt shown', async () => (await text(page, '[data-testid=attempt]')) === '1 of 3');
    await until('queue position shown', async () => (await text(page, '[data-testid=queue-position]')) === '1');
    await shot('queued');
    await page.goto(`${base}/ui/#/?status=pending`);
    await until('its place and priority in the list', async () => {
      const row = await text(page, `tr[data-uuid="${uuid}"]`);
      return /#1\b/.test(row) && /\b7\b/.test(row);
    });
    await shot('list');
    await page.goto(`${base}/ui/#/requests/${uuid}`);
    await until('cancel enabled', () => enabled(page, 'cancel'));
    await page.locator('[data-testid=cancel]').click();
    await waitStatus(page, 'cancelled', 10_000);
    // Nothing listens on port 9: the delivery's first attempt fails, and the page shows it
    // with the error the API reports (an attempt in flight counts before its error exists).
    await until('failed delivery attempt listed', async () => {
      const [d] = (await api(`/requests/${uuid}`)).webhooks || [];
      if (!d || !(d.attempts >= 1) || !d.last_error || d.state !== 'pending') return false;
      if ((await page.locator('[data-testid=delivery]').count()) !== 1) return false;
      const line = await text(page, '[data-testid=delivery]');
      return line.includes(hook) && /finished/.test(line) && /\b[1-9]\d* attempts?\b/.test(line)
        && line.includes(d.last_error) && line;
    }, 30_000);
    await shot('webhook');
  },

  /**
   * The console view's side of the WebSocket protocol, against a socket Playwright fakes in the
   * page (the server's socket comes with the console branch): colours, hello/typist/missed/
   * status frames, take → keystrokes as binary frames, a reconnect from the offset reached, no
   * reconnect after a final status. The request itself is real (pending: no agents here).
   */
  async 'console-protocol'(page, shot) {
    const { uuid } = await api('/requests', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ vm_name: 'tiny', commands: 'echo mocked' }),
    });
    const urls = [];
    const fromClient = [];
    let sock = null;
    await page.routeWebSocket(/\/requests\/[0-9a-f-]+\/console/, (ws) => {
      urls.push(ws.url());
      sock = ws;
      ws.onMessage((m) => {
        fromClient.push(m);
        if (typeof m === 'string' && JSON.parse(m).type === 'take') {
          ws.send(JSON.stringify({ type: 'typist', who: 'you', you: true }));
        } else if (typeof m !== 'string') {
          ws.send(m); // echo, as a tty would
        }
      });
      const first = urls.length === 1;
      ws.send(JSON.stringify({ type: 'hello', offset: first ? 0 : 5000, status: 'running', typist: first ? 'ci-bot' : null }));
      // Green "boot-green", then a prompt.
      if (first) ws.send(Buffer.from('\x1b[32mboot-green\x1b[0m\r\n# ', 'utf8'));
    });
    await page.goto(`${base}/ui/#/requests/${uuid}`);
    await until('mocked bytes on screen', async () => /boot-green/.test(await consoleText(page)));
    await until('typist named', async () => /ci-bot is typing/.test(await text(page, '[data-testid=console-mode]')));
    // ANSI colours reach the terminal: the word is drawn in a foreground colour class.
    const coloured = await page.locator('[data-testid=console] .xterm-rows span', { hasText: 'boot-green' }).first().getAttribute('class');
    if (!/xterm-fg-2/.test(coloured || '')) throw new Error(`boot-green not green: class=${coloured}`);
    await until('attach enabled', () => enabled(page, 'attach'));
    await page.locator('[data-testid=attach]').click();
    await until('we type', async () => /you are typing/.test(await text(page, '[data-testid=console-mode]')));
    await page.locator('[data-testid=console] .xterm').click();
    await page.keyboard.type('ls\n');
    await until('keystrokes sent as binary frames', async () =>
      fromClient.filter((m) => typeof m !== 'string').map((b) => b.toString()).join('') === 'ls\r');
    if (!fromClient.some((m) => typeof m === 'string' && JSON.parse(m).type === 'take')) throw new Error('no take frame');
    await until('echo drawn', async () => /# ls/.test(await consoleText(page)));
    sock.send(JSON.stringify({ type: 'missed', bytes: 4096, offset: 5000 }));
    await until('missed notice', async () => /4096 bytes not shown/.test(await consoleText(page)));
    await shot('typing');
    // A dropped socket reconnects from the offset reached: the missed frame said 5000.
    await sock.close({ code: 1011 });
    await until('reconnected', async () => urls.length === 2, 10_000);
    if (!/[?&]from=5000$/.test(urls[1])) throw new Error(`reconnect url ${urls[1]}`);
    if (/bearer/.test(urls.join(' '))) throw new Error('token leaked into the URL');
    await until('typing stopped with the old socket', async () => /nobody is typing/.test(await text(page, '[data-testid=console-mode]')));
    sock.send(JSON.stringify({ type: 'status', status: 'done' }));
    await sock.close({ code: 1000 });
    await until('closed for good', async () => /request has ended/.test(await text(page, '[data-testid=console-mode]')));
    await new Promise((r) => setTimeout(r, 2000));
    if (urls.length !== 2) throw new Error(`reconnected after the final status: ${urls.length} sockets`);
    await shot('closed');
    await api(`/requests/${uuid}/status`, {
      method: 'PUT', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ status: 'cancelled' }),
    });
  },

  /** Needs the artifacts API (files branch): collect a file, list it, download it. */
  async artifacts(page, shot) {
    await submitForm(page, shot, 'mkdir -p /root/out && echo artifact-body > /root/out/a.txt', { artifacts: '/root/out/*' });
    await waitStatus(page, 'done');
    await until('artifact listed', async () => /\/root\/out\/a\.txt/.test(await text(page, '[data-testid=artifacts]')));
    const [dl] = await Promise.all([page.waitForEvent('download'),
      page.locator('[data-testid=artifacts] li', { hasText: 'a.txt' }).locator('button').click()]);
    const body = await readFile(await dl.path(), 'utf8');
    if (body !== 'artifact-body\n') throw new Error(`artifact bytes: ${JSON.stringify(body)}`);
    await shot('listed');
  },

  /**
   * Needs the console branch (the WebSocket and keep_on_failure): keep a failing run, attach
   * in the page, type a command and see its output, then release the VM.
   */
  async 'keep-attach'(page, shot) {
    const uuid = await submitForm(page, shot, 'echo about-to-fail; exit 3', { keep: 300 });
    await until('kept_until set', async () => (await api(`/requests/${uuid}`)).kept_until, VM_TIMEOUT);
    await until('live console mode', async () => /live console/.test(await text(page, '[data-testid=console-mode]')));
    await until('attach enabled', () => enabled(page, 'attach'));
    await page.locator('[data-testid=attach]').click();
    await until('we are the typist', async () => /you are typing/.test(await text(page, '[data-testid=console-mode]')));
    await page.locator('[data-testid=console] .xterm').click();
    await page.keyboard.type('echo typed-$((6*7))\n', { delay: 20 });
    await until('typed-42 on the console', async () => /typed-42/.test(await consoleText(page)), 60_000);
    await shot('attached');
    await until('release enabled', () => enabled(page, 'release'));
    await page.locator('[data-testid=release]').click();
    await waitStatus(page, 'done', 60_000);
    await until('exit code 3', async () => (await text(page, '[data-testid=exit-code]')) === '3');
    await shot('released');
  },
};

const profile = mkdtempSync(join(tmpdir(), 'sqsim-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--no-first-run'],
  viewport: { width: 1360, height: 900 },
});
const failures = [];
try {
  for (const name of names) {
    const fn = scenarios[name];
    if (!fn) throw new Error(`unknown scenario ${name}; known: ${Object.keys(scenarios).join(', ')}`);
    const page = await context.newPage();
    // Against an auth-on server, every scenario but the prompt's own starts signed in.
    if (process.env.UI_TOKEN && name !== 'token') {
      await page.addInitScript((t) => sessionStorage.setItem('sqlite-sim.token', t), process.env.UI_TOKEN);
    }
    const problems = [];
    // A CSP violation or a script error is a failure, whatever the scenario checks.
    page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
    page.on('console', (m) => {
      if (m.type() === 'error' && !/status of 40[14]|WebSocket connection/.test(m.text())) problems.push(`console error: ${m.text()}`);
    });
    const shot = (step) => page.screenshot({ path: join(outDir, `${name}-${step}.png`), fullPage: true });
    const start = Date.now();
    try {
      await fn(page, shot);
      if (problems.length) throw new Error(problems.join('\n'));
      console.log(`ok   ${name} (${((Date.now() - start) / 1000).toFixed(1)} s)`);
    } catch (e) {
      failures.push(name);
      console.log(`FAIL ${name}: ${e.stack || e}`);
      if (problems.length) console.log(problems.join('\n'));
      await page.screenshot({ path: join(outDir, `${name}-FAILED.png`), fullPage: true }).catch(() => {});
    }
    await page.close();
  }
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
console.log(`screenshots in ${outDir}`);
process.exit(failures.length ? 1 : 0);

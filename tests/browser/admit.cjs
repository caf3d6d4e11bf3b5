// Linked admission in headless Chromium (Playwright): loads the DVR page with
// a client certificate for the page's origin only, lets its WebSocket video
// play on the admitting port, prints "phase1-done", waits for a line on
// stdin (the test revokes the certificate meanwhile), then opens a new
// WebSocket from the page and prints how it went.
// Usage: TCPFWD_PLAYWRIGHT=.../playwright-core node admit.cjs URL PFX PASSWORD
//
// Playwright's clientCertificates option is a SOCKS proxy inside Playwright:
// every browser connection goes through it, and its own sockets (from
// 127.0.0.1) reach tcpfwd. For the origin given it terminates the browser's
// TLS and makes its own handshake with the certificate; any other origin (the
// WebSocket port) is tunnelled byte for byte, so that TLS is Chromium's, with
// no certificate.
const { chromium } = require(process.env.TCPFWD_PLAYWRIGHT);
const readline = require('readline');

(async () => {
  const [url, pfx, passphrase] = process.argv.slice(2);
  const origin = new URL(url).origin;
  const browser = await chromium.launch({
    executablePath: process.env.TCPFWD_CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
           '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  try {
    const context = await browser.newContext({
      ignoreHTTPSErrors: true,
      clientCertificates: [{ origin, pfxPath: pfx, passphrase }],
    });
    const page = await context.newPage();
    const response = await page.goto(url);
    console.log(`status=${response.status()}`);
    console.log(`title=${await page.title()}`);
    await page.waitForFunction(
      () => document.getElementById('log').textContent.startsWith('frames='),
      null, { timeout: 30000 });
    console.log(await page.textContent('#log'));
    console.log('phase1-done');
    const lines = readline.createInterface({ input: process.stdin });
    await new Promise((resolve) => lines.once('line', resolve));
    lines.close();
    const second = await page.evaluate(() => new Promise((resolve) => {
      const p = new URLSearchParams(location.search).get('ws');
      const ws = new WebSocket('wss://' + location.hostname + ':' + p + '/stream');
      let opened = false, frames = 0, error = false;
      ws.onopen = () => { opened = true; };
      ws.onmessage = () => { frames++; };
      ws.onerror = () => { error = true; };
      ws.onclose = (e) => resolve(`opened=${opened} frames=${frames} error=${error} code=${e.code}`);
    }));
    console.log(`second: ${second}`);
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(e); process.exit(1); });

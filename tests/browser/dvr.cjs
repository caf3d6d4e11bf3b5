// Loads the DVR page through tcpfwd in headless Chromium (Playwright), waits
// for the page's WebSocket video to finish, and prints what the page reports.
// Usage: TCPFWD_PLAYWRIGHT=.../node_modules/playwright-core node dvr.cjs URL
const { chromium } = require(process.env.TCPFWD_PLAYWRIGHT);

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.TCPFWD_CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
           '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  try {
    // The self-signed default: a newcomer clicks through the warning; so does this.
    const context = await browser.newContext({ ignoreHTTPSErrors: true });
    const page = await context.newPage();
    const response = await page.goto(process.argv[2]);
    console.log(`status=${response.status()}`);
    console.log(`title=${await page.title()}`);
    await page.waitForFunction(
      () => document.getElementById('log').textContent.startsWith('frames='),
      null, { timeout: 30000 });
    console.log(await page.textContent('#log'));
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(e); process.exit(1); });

'use strict';
// Shared helpers for the kappa Node client scripts: argument parsing, a failure handler that
// prints a clear message and exits non-zero, and polling with a deadline.

const assert = require('node:assert/strict');

function bootstrap() {
  const address = process.argv[2];
  if (!address) {
    console.error(`usage: node ${require('node:path').basename(process.argv[1])} HOST:PORT [args...]`);
    process.exit(2);
  }
  return address;
}

// Runs `main` and turns any rejection into a message on stderr and exit code 1. A watchdog
// makes a hung client fail instead of waiting for the Rust side's timeout.
function runMain(main, timeoutMs = 90000) {
  const watchdog = setTimeout(() => {
    console.error(`FAIL: ${process.argv[1]} did not finish within ${timeoutMs} ms`);
    process.exit(1);
  }, timeoutMs);
  main()
    .then((summary) => {
      clearTimeout(watchdog);
      console.log(JSON.stringify(summary));
      process.exit(0);
    })
    .catch((err) => {
      console.error(`FAIL: ${err && err.stack ? err.stack : err}`);
      process.exit(1);
    });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Polls `check` until it returns a truthy value or the deadline passes.
async function waitFor(what, check, timeoutMs = 30000, intervalMs = 50) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${typeof what === 'function' ? what() : what}`);
    await sleep(intervalMs);
  }
}

// A unique suffix so scripts can share one broker without colliding.
const unique = () => `${Date.now().toString(36)}-${Math.floor(Math.random() * 1e6).toString(36)}`;

// Progress notes on stderr, so a failure shows how far a script got.
const step = (what) => process.stderr.write(`[step ${new Date().toISOString()}] ${what}\n`);

module.exports = { step, assert, bootstrap, runMain, sleep, waitFor, unique };

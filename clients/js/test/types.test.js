// kappa.d.ts compiles under `tsc --strict` and fits how the API is used (test/types-check.ts).

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');

test('the TypeScript declarations type-check the documented usage', () => {
  const tsc = join(root, 'node_modules/.bin/tsc');
  const args = ['--noEmit', '--strict', '--target', 'es2022', '--module', 'nodenext', '--moduleResolution', 'nodenext', '--lib', 'es2022,dom,dom.iterable,dom.asynciterable', '--types', '', 'test/types-check.ts'];
  const result = spawnSync(tsc, args, { cwd: root, encoding: 'utf8' });
  assert.equal(result.error, undefined, `cannot run ${tsc}: ${result.error?.message} (npm ci in clients/js)`);
  assert.equal(result.status, 0, `tsc failed:\n${result.stdout}${result.stderr}`);
});

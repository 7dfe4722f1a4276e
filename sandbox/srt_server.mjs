// srt as a long-lived helper for one BashTool (one policy, one work dir): sandbox/__init__.py
// starts it, and it answers one JSON object per line on stdout to one per line on stdin.
//
//   node srt_server.mjs LIB_DIR SETTINGS_FILE      (cwd: the work dir; env: the command's)
//
// LIB_DIR is sandbox-runtime's dist/ (the pinned srt); SETTINGS_FILE is the same file the srt
// CLI would get with --settings. It initialises srt once (its proxy and bridges live here,
// as in the CLI), then for every command only wraps it: the harness runs the bwrap command
// line itself in a shell, as the CLI would (`/bin/sh -c LINE`), so timeouts, the cgroup and
// the environment are the harness's as before. Saved per call: Node's start-up and srt's
// initialisation, about 0.4 s.
//
// First line out: {"ready": true, "pid", "version", "settings_sha256"} or
// {"ready": false, "error"} (then exit 1). Then, per request {"id": N, "op": ...}:
//   wrap     {"command"} -> {"id", "ok": true, "wrapped"} | {"id", "ok": false, "error"}
//   started  {"pgid"}    -> no reply: the group that runs the last wrapped command
//   cleanup  {}          -> {"id", "ok": true}: srt's own clean-up after a command
// End of stdin ends the helper: at once, or once the group of a command still running
// (its harness died) is gone, so srt never removes the mount points of a running sandbox.

import { createRequire, syncBuiltinESMExports } from 'node:module';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as readline from 'node:readline';
import { pathToFileURL } from 'node:url';

// stdout carries the protocol and nothing else: anything srt prints goes to stderr.
const send = message => process.stdout.write(`${JSON.stringify(message)}\n`);
for (const name of ['log', 'info', 'warn', 'debug']) console[name] = console.error.bind(console);

const GROUP_POLL_MS = 100;
// The programs srt looks up on PATH with `which` (its whichSync spawns it each time): the shell
// it runs the command with, on every wrap, and its own dependencies.
const REMEMBERED = new Set(['bash', 'bwrap', 'socat', 'rg']);

// srt asks `which bash` on every wrap, a fork of this process and a shell script: 3 ms of a
// ~19 ms wrap. The answer is a PATH lookup of a host program, not a decision about the work
// dir: the harness gives this helper a PATH without any directory a sandboxed command can
// write (sandbox/__init__.py, _search_path). So a found answer is kept for the helper's life;
// one not found is asked again (an install may follow). Every other spawnSync, and a `which`
// asked any other way, goes to Node's own. Node's builtin modules take such a replacement
// only through syncBuiltinESMExports, which srt's `import { spawnSync }` then sees.
function rememberWhich() {
  const childProcess = createRequire(import.meta.url)('node:child_process');
  const spawnSync = childProcess.spawnSync;
  const found = new Map();
  childProcess.spawnSync = function (file, args, options) {
    const name = Array.isArray(args) && args.length === 1 ? args[0] : undefined;
    if (file !== 'which' || !REMEMBERED.has(name) || options?.encoding !== 'utf8') {
      return spawnSync.apply(this, arguments);
    }
    if (found.has(name)) {
      const stdout = found.get(name);
      return { pid: 0, output: [null, stdout, ''], stdout, stderr: '', status: 0, signal: null };
    }
    const result = spawnSync.apply(this, arguments);
    if (result.status === 0 && typeof result.stdout === 'string' && result.stdout.startsWith('/')) {
      found.set(name, result.stdout);
    }
    return result;
  };
  syncBuiltinESMExports();
}

function fail(error) {
  send({ ready: false, error: String(error instanceof Error ? error.message : error) });
  process.exit(1);
}

// The group's leader is bwrap (its sandbox dies with it) or the shell that execs it. A zombie
// counts as gone: an init in a container may never reap it.
function groupAlive(pgid) {
  try {
    const stat = fs.readFileSync(`/proc/${pgid}/stat`, 'latin1');
    return !['Z', 'X'].includes(stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3));
  } catch {
    return false;
  }
}

async function start(libDir, settingsPath) {
  rememberWhich();
  const lib = file => pathToFileURL(path.join(libDir, file)).href;
  const { SandboxManager } = await import(lib('index.js'));
  const { loadConfig } = await import(lib('utils/config-loader.js'));
  const pkg = JSON.parse(fs.readFileSync(path.join(libDir, '..', 'package.json'), 'utf-8'));
  const raw = fs.readFileSync(settingsPath);
  // As the CLI with --settings: a missing, empty or invalid file is refused, never defaulted.
  const loaded = loadConfig(settingsPath);
  if (loaded.kind !== 'ok') fail(`settings refused (${loaded.kind}): ${loaded.reason ?? settingsPath}`);
  await SandboxManager.initialize(loaded.config);
  return { SandboxManager, version: pkg.version, sha: createHash('sha256').update(raw).digest('hex') };
}

async function main() {
  const [libDir, settingsPath] = process.argv.slice(2);
  if (!libDir || !settingsPath) fail('usage: node srt_server.mjs LIB_DIR SETTINGS_FILE');
  // A signal ends the helper through process.exit, whose handlers (srt's) remove the mount
  // points and stop the bridges; srt's own SIGINT handler alone would reset and live on.
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP']) process.on(signal, () => process.exit(1));
  process.on('uncaughtException', err => { console.error(err); process.exit(1); });
  process.on('unhandledRejection', err => { console.error(err); process.exit(1); });

  let srt;
  try {
    srt = await start(libDir, settingsPath);
  } catch (err) {
    fail(err);
  }
  const { SandboxManager } = srt;
  let running = null; // { pgid } of a wrapped command not yet cleaned up after

  async function handle(request) {
    const { id, op } = request;
    if (op === 'wrap') {
      if (typeof request.command !== 'string') return { id, ok: false, error: 'no command' };
      if (SandboxManager.getConfig() === undefined) return { id, ok: false, error: 'srt is not initialised' };
      const wrapped = await SandboxManager.wrapWithSandbox(request.command);
      if (typeof wrapped !== 'string' || wrapped === request.command) {
        return { id, ok: false, error: 'srt returned the command unwrapped' };
      }
      running = { pgid: null };
      return { id, ok: true, wrapped };
    }
    if (op === 'started') {
      if (running && Number.isInteger(request.pgid) && request.pgid > 1) running.pgid = request.pgid;
      return null;
    }
    if (op === 'cleanup') {
      SandboxManager.cleanupAfterCommand();
      running = null;
      return { id, ok: true };
    }
    return { id, ok: false, error: `unknown op ${JSON.stringify(op)}` };
  }

  // One request at a time, in order: the harness waits for each answer anyway.
  let queue = Promise.resolve();
  const input = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
  input.on('line', line => {
    queue = queue.then(async () => {
      let request;
      try {
        request = JSON.parse(line);
      } catch {
        send({ id: null, ok: false, error: 'not JSON' });
        return;
      }
      try {
        const reply = await handle(request);
        if (reply !== null) send(reply);
      } catch (err) {
        send({ id: request?.id ?? null, ok: false, error: String(err instanceof Error ? err.message : err) });
      }
    });
  });
  input.on('close', () => {
    queue.then(() => {
      const pgid = running?.pgid;
      if (!pgid || !groupAlive(pgid)) process.exit(0);
      setInterval(() => { if (!groupAlive(pgid)) process.exit(0); }, GROUP_POLL_MS);
    });
  });

  send({ ready: true, pid: process.pid, version: srt.version, settings_sha256: srt.sha });
}

main();

// Running the jobcachefs binary from the action: through `sudo -n` when the runner is not root
// (the sudoers line in docs/src/ci-systems.md), with --state-dir/--config from the environment
// passed as flags (sudo drops the environment), as runners/common.sh does.

import { spawnSync } from 'node:child_process'

export const MARKER = '.jobcachefs-success'

/** Runs `jobcachefs ARGS`; returns { code, stdout, stderr }. Throws only if it cannot start. */
export function jobcachefs (binary, args) {
  const global = []
  if (process.env.JOBCACHEFS_STATE_DIR) global.push('--state-dir', process.env.JOBCACHEFS_STATE_DIR)
  if (process.env.JOBCACHEFS_CONFIG) global.push('--config', process.env.JOBCACHEFS_CONFIG)
  const [cmd, argv] = asRoot(binary, [...global, ...args])
  const r = spawnSync(cmd, argv, { encoding: 'utf8' })
  if (r.error) throw new Error(`could not run ${cmd}: ${r.error.message}`)
  return { code: r.status ?? 128, stdout: r.stdout, stderr: r.stderr }
}

/** `cmd ARGS` as root: itself when the runner is root, else through `sudo -n`. */
export function asRoot (cmd, args) {
  return process.getuid() === 0 ? [cmd, args] : ['sudo', ['-n', cmd, ...args]]
}

/** The "outcome" of `volume delete -o json`, or "" when its output is not that JSON. */
export function outcome (stdout) {
  try {
    return JSON.parse(stdout).outcome || ''
  } catch {
    return ''
  }
}

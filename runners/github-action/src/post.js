// The action's post step (`post-if: always()`: it runs whatever happened to the job): deletes the
// volume the main step made, committing it — into the cache or the job's scope — only when the
// job succeeded so far. How it knows: the input `job-status`, whose default is
// `${{ job.status }}`; the runner evaluates an action's inputs, defaults included, again for its
// post step, when `job.status` is the job's status after every step before this one
// ("success", "failure" or "cancelled"). A commit the cache refuses (over its size) is a
// warning, not a failure of the job.

import * as core from '@actions/core'
import { rmSync } from 'node:fs'
import { join } from 'node:path'
import { spawnSync } from 'node:child_process'
import { MARKER, asRoot, jobcachefs, outcome } from './jobcachefs.js'

function run () {
  const dir = core.getState('dir')
  if (!dir) {
    core.info('jobcachefs: the main step made no volume: nothing to delete')
    return
  }
  const binary = core.getInput('jobcachefs') || process.env.JOBCACHEFS || 'jobcachefs'
  const status = core.getInput('job-status')
  const commit = status === 'success'
  // The success marker of the pod recipes never reaches a cache, here neither.
  try {
    rmSync(join(dir, MARKER), { force: true })
  } catch {
    const [cmd, argv] = asRoot('rm', ['-f', join(dir, MARKER)])
    spawnSync(cmd, argv)
  }
  const args = ['volume', 'delete', dir, '-o', 'json']
  if (!commit) args.push('--discard')
  const r = jobcachefs(binary, args)
  const what = commit ? 'the job succeeded' : `the job's status is "${status || 'unknown'}"`
  if (r.code === 0) {
    core.info(`jobcachefs: ${what}: ${outcome(r.stdout)} (${r.stdout.replace(/\s+/g, ' ').trim()})`)
  } else if (r.code === 3) {
    core.warning(`jobcachefs: ${what}, but the cache refused the commit: ${r.stdout.replace(/\s+/g, ' ').trim()} ${r.stderr.trim()}`)
  } else {
    // The volume stays mounted; the next job's main step on this runner discards it.
    core.warning(`jobcachefs volume delete ${dir} failed (exit ${r.code}): ${r.stderr.trim()}`)
  }
}

try {
  run()
} catch (e) {
  core.warning(e.message)
}

// The action's main step: makes the job's volume at `path` (mounted, owned by the runner's user),
// reading the cache and, for every ref that does not write into the cache, the job's scope
// (src/mapping.js). Saves the volume's path in the action's state for the post step
// (src/post.js), which commits it when the job succeeded and discards it otherwise.

import * as core from '@actions/core'
import { readFileSync } from 'node:fs'
import { resolve } from 'node:path'
import { spawnSync } from 'node:child_process'
import { dnsLabel, githubTarget } from './mapping.js'
import { asRoot, jobcachefs, outcome } from './jobcachefs.js'

function payload () {
  try {
    return JSON.parse(readFileSync(process.env.GITHUB_EVENT_PATH, 'utf8'))
  } catch {
    return null
  }
}

function run () {
  const binary = core.getInput('jobcachefs') || process.env.JOBCACHEFS || 'jobcachefs'
  const workspace = process.env.GITHUB_WORKSPACE || process.cwd()
  const dir = resolve(workspace, core.getInput('path', { required: true }))
  const cache = core.getInput('cache') || dnsLabel(process.env.GITHUB_REPOSITORY || 'cache')
  const namespace = core.getInput('namespace') || 'ci'
  // The inputs are the admin's knobs of runners/common.sh, as its environment variables.
  const env = { ...process.env }
  for (const [input, name] of [
    ['scope', 'JOBCACHEFS_SCOPE'],
    ['write-back', 'JOBCACHEFS_WRITE_BACK'],
    ['default-branch', 'JOBCACHEFS_DEFAULT_BRANCH'],
    ['trusted-refs', 'JOBCACHEFS_TRUSTED_REFS']
  ]) {
    const v = core.getInput(input)
    if (v !== '') env[name] = v
  }
  const target = githubTarget(env, payload())

  // A volume at `path` is one a job left whose post step never ran (a killed runner): nothing
  // says that job succeeded, so it is discarded, never committed.
  const left = jobcachefs(binary, ['volume', 'delete', dir, '--discard', '-o', 'json'])
  if (left.code !== 0) throw new Error(`jobcachefs volume delete ${dir} --discard failed: ${left.stderr.trim()}`)
  if (outcome(left.stdout) !== 'not-found') {
    core.warning(`jobcachefs: discarded the volume a job left at ${dir} (its post step never ran)`)
  }

  const args = ['volume', 'create', dir, '--cache', cache, '--namespace', namespace]
  if (target.scope) args.push('--scope', target.scope)
  const size = core.getInput('size')
  if (size) args.push('--size', size)
  if (target.writeBack) args.push('--write-back')
  const made = jobcachefs(binary, args)
  if (made.code !== 0) throw new Error(`jobcachefs ${args.join(' ')} failed: ${made.stderr.trim()}`)
  // From here the post step must delete it, whatever happens next.
  core.saveState('dir', dir)
  if (process.getuid() !== 0) {
    const [cmd, argv] = asRoot('chown', [`${process.getuid()}:${process.getgid()}`, dir])
    const r = spawnSync(cmd, argv, { encoding: 'utf8' })
    if (r.status !== 0) throw new Error(`could not give ${dir} to the runner's user: ${r.stderr}`)
  }

  core.exportVariable('JOBCACHEFS_DIR', dir)
  core.setOutput('dir', dir)
  core.setOutput('scope', target.scope)
  core.setOutput('writes-to', !target.writeBack ? 'nothing' : target.scope ? 'scope' : 'cache')
  const where = target.scope ? `cache ${namespace}/${cache}, scope ${target.scope}` : `cache ${namespace}/${cache}`
  core.info(`jobcachefs: ${where} at ${dir} (write-back: ${target.writeBack ? (target.scope ? 'into the scope' : 'into the cache') : 'none'}, on success)`)
}

try {
  run()
} catch (e) {
  core.setFailed(e.message)
}

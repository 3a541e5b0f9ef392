// The mapping from a GitHub Actions job to where its volume writes back — the cache, or the job's
// own scope of it — for JavaScript. runners/common.sh is the same mapping for shell; both are
// tested against one table, runners/mapping-cases.json (integration-tests/runners.rs runs
// test/mapping.test.js). Pure: it reads only the environment and the event payload it is given.
//
//  - a pull request writes into the scope "pr-<number>", whatever its branch (pull_request_target
//    runs with GITHUB_REF set to the base branch, so the event's name decides, not the ref);
//  - a push (or schedule, dispatch, ...) of refs/heads/<default branch>, and refs the admin
//    trusts (JOBCACHEFS_TRUSTED_REFS), write into the cache;
//  - any other ref writes into its own scope: its name made a DNS label (dnsLabel).
// The admin's knobs, as environment variables (the action's inputs set them too):
// JOBCACHEFS_WRITE_BACK (auto | false), JOBCACHEFS_DEFAULT_BRANCH, JOBCACHEFS_TRUSTED_REFS,
// JOBCACHEFS_SCOPE.

import { createHash } from 'node:crypto'

/**
 * A DNS-1123 label from any name: ASCII letters lower-cased, every other character outside
 * [a-z0-9-] a '-', runs of '-' made one, '-' trimmed at both ends; longer than 63: its first 54
 * characters, '-', and the first 8 hex digits of the SHA-256 of the original name (UTF-8); empty:
 * "ref-" and those 8 digits. Only ASCII is lower-cased, as `tr A-Z a-z` does in the shell
 * version: String.prototype.toLowerCase would turn "İ" into "i̇" and "K" (Kelvin) into "k".
 */
export function dnsLabel (name) {
  let s = ''
  for (const c of name) {
    if (c >= 'A' && c <= 'Z') s += c.toLowerCase()
    else if ((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c === '-') s += c
    else s += '-'
  }
  s = s.replace(/-+/g, '-').replace(/^-/, '').replace(/-$/, '')
  if (s === '' || s.length > 63) {
    const h = createHash('sha256').update(name, 'utf8').digest('hex').slice(0, 8)
    s = s === '' ? `ref-${h}` : `${s.slice(0, 54)}-${h}`
  }
  return s
}

/** A shell pattern (`*`, `?`, `[...]`, `[!...]`) as a RegExp matching the whole name. */
function globToRegExp (pattern) {
  let re = ''
  for (let i = 0; i < pattern.length; i++) {
    const c = pattern[i]
    if (c === '*') re += '.*'
    else if (c === '?') re += '.'
    else if (c === '[') {
      const end = pattern.indexOf(']', i + 2)
      if (end < 0) {
        re += '\\['
        continue
      }
      let body = pattern.slice(i + 1, end)
      if (body.startsWith('!')) body = '^' + body.slice(1)
      re += '[' + body.replace(/\\/g, '\\\\') + ']'
      i = end
    } else re += c.replace(/[.+^${}()|\\/]/g, '\\$&')
  }
  return new RegExp(`^${re}$`, 's')
}

/** Whether `name` matches one of `patterns` (shell patterns separated by spaces or commas). */
export function refMatches (name, patterns) {
  return (patterns || '')
    .split(/[\s,]+/)
    .filter(p => p !== '')
    .some(p => globToRegExp(p).test(name))
}

/**
 * Where a job writes: `{ scope, writeBack }`, `scope` "" for the cache itself. `ref`: the branch
 * or tag name; `pr`: the pull request's number or ""; `trusted`: whether the ref may write into
 * the cache.
 */
export function decide (env, ref, pr, trusted) {
  let scope
  if (env.JOBCACHEFS_SCOPE) scope = env.JOBCACHEFS_SCOPE
  else if (pr) scope = `pr-${pr}`
  else if (trusted) scope = ''
  else scope = dnsLabel(ref)
  return { scope, writeBack: env.JOBCACHEFS_WRITE_BACK !== 'false' }
}

/** The mapping from the runner's documented variables and the event payload (or null). */
export function githubTarget (env, payload) {
  const event = env.GITHUB_EVENT_NAME || ''
  const ref = env.GITHUB_REF || ''
  if (event.startsWith('pull_request')) {
    let pr = ''
    const m = /^refs\/pull\/([^/]+)\//.exec(ref)
    if (m) pr = m[1]
    else if (payload?.pull_request?.number != null) pr = String(payload.pull_request.number)
    if (!/^[0-9]+$/.test(pr)) pr = ''
    const name = env.GITHUB_HEAD_REF || env.GITHUB_REF_NAME || ref || 'pull-request'
    return decide(env, name, pr, false)
  }
  const name = env.GITHUB_REF_NAME || ref.replace(/^refs\/heads\//, '').replace(/^refs\/tags\//, '')
  const defaultBranch = env.JOBCACHEFS_DEFAULT_BRANCH || payload?.repository?.default_branch || ''
  const trusted =
    (defaultBranch !== '' && ref === `refs/heads/${defaultBranch}`) ||
    (Boolean(env.JOBCACHEFS_TRUSTED_REFS) && refMatches(name, env.JOBCACHEFS_TRUSTED_REFS))
  return decide(env, name, '', trusted)
}

// The JavaScript mapping against the table runners/common.sh is tested against too
// (integration-tests/runners.rs runs this file with `node --test`).
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import { dnsLabel, githubTarget, refMatches } from '../src/mapping.js'

const table = JSON.parse(
  readFileSync(fileURLToPath(new URL('../../mapping-cases.json', import.meta.url)), 'utf8')
)

test('labels', () => {
  for (const c of table.label) {
    assert.equal(dnsLabel(c.in), c.out, `dnsLabel(${JSON.stringify(c.in)})`)
    assert.match(dnsLabel(c.in), /^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$/)
  }
})

for (const c of table.github) {
  test(`github: ${c.name}`, () => {
    assert.deepEqual(githubTarget(c.env, c.payload ?? null), c.expect)
  })
}

test('patterns are shell patterns', () => {
  assert.ok(refMatches('release/1.2', 'release/*'))
  assert.ok(refMatches('v2', 'x, v[0-9]*'))
  assert.ok(!refMatches('va', 'v[0-9]*'))
  assert.ok(refMatches('va', 'v[!0-9]*'))
  assert.ok(!refMatches('release', 'release/*'))
  assert.ok(refMatches('a.b', 'a.b') && !refMatches('axb', 'a.b'))
  assert.ok(!refMatches('anything', ''))
})

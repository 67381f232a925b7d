#!/usr/bin/env node
// Scores a results file of the HTTP cache conformance suite (npm package
// http-cache-tests@0.4.5, the suite behind cache-tests.fyi) the way
// cache-tests.fyi counts, and prints the peers' results that ship with the
// package beside it.
//
//   node score.mjs [--suite DIR] [--name LABEL] [--no-peers] [--cross-check] [results.json]
//   node score.mjs --list-ids [--suite DIR]
//
//   --suite DIR     the installed package (default:
//                   ${XDG_CACHE_HOME:-$HOME/.cache}/shield-http-cache-tests-0.4.5/node_modules/http-cache-tests)
//   --name LABEL    what to call the results in the output (default: Shield)
//   --no-peers      leave out the side-by-side table of bundled peer results
//   --cross-check   also score every result set with the suite's own verdict
//                   function (lib/display.mjs) and fail if any verdict differs
//   --list-ids      print the id of every test a proxy run executes, and exit
//   results.json    what the suite's client printed; without it, only peers
//
// Counting rules (those of the suite's determineTestResult, which the site uses):
//   - A test's kind is `required` (also when it has no kind), `optimal` or
//     `check`; checks are informational and pass/fail nothing.
//   - Tests marked browser_only are not run against proxies and not counted.
//   - A test whose `depends_on` lists a test that did not pass counts as not
//     passed, whatever its own result (recursively: a dependency may itself
//     depend on another).
//   - Otherwise a result of `true` passes; ["Setup", ...] is a setup failure
//     (["Setup", "retry"] a retry), anything else a failure. Missing = not run.
// Exit status: 0 when scoring worked, 1 on a cross-check mismatch, 2 on bad
// input (usage, missing suite, unreadable results).

import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { pathToFileURL } from 'node:url'

const SUITE_VERSION = '0.4.5'

function fail (msg, code = 2) {
  console.error(`score.mjs: ${msg}`)
  process.exit(code)
}

// ---- arguments ----------------------------------------------------------------
const opts = { suite: null, name: 'Shield', peers: true, crossCheck: false, listIds: false, file: null }
const argv = process.argv.slice(2)
for (let i = 0; i < argv.length; i++) {
  const a = argv[i]
  const value = () => (i + 1 < argv.length ? argv[++i] : fail(`${a} needs a value`))
  if (a === '--suite') opts.suite = value()
  else if (a === '--name') opts.name = value()
  else if (a === '--no-peers') opts.peers = false
  else if (a === '--cross-check') opts.crossCheck = true
  else if (a === '--list-ids') opts.listIds = true
  else if (a === '-h' || a === '--help') {
    console.log('usage: node score.mjs [--suite DIR] [--name LABEL] [--no-peers] [--cross-check] [results.json]\n' +
      '       node score.mjs --list-ids [--suite DIR]')
    process.exit(0)
  } else if (a.startsWith('-')) fail(`unknown option ${a}`)
  else if (opts.file) fail('give at most one results file')
  else opts.file = a
}

// ---- the suite's test definitions -----------------------------------------------
const cacheRoot = process.env.XDG_CACHE_HOME || path.join(os.homedir(), '.cache')
const suiteDir = path.resolve(opts.suite ||
  path.join(cacheRoot, `shield-http-cache-tests-${SUITE_VERSION}`, 'node_modules', 'http-cache-tests'))
if (!fs.existsSync(path.join(suiteDir, 'tests', 'index.mjs'))) {
  fail(`no http-cache-tests package at ${suiteDir} (run.sh installs it; or pass --suite DIR)`)
}
const suiteLoad = rel => import(pathToFileURL(path.join(suiteDir, rel)).href)
const pkgVersion = JSON.parse(fs.readFileSync(path.join(suiteDir, 'package.json'), 'utf8')).version
if (pkgVersion !== SUITE_VERSION) {
  console.error(`score.mjs: warning: ${suiteDir} is http-cache-tests ${pkgVersion}, not ${SUITE_VERSION}`)
}

// The client (cli.mjs) runs tests/index.mjs plus tests/surrogate-control.mjs,
// which index.mjs leaves out; score exactly that set.
const suites = [...(await suiteLoad('tests/index.mjs')).default]
const surrogate = (await suiteLoad('tests/surrogate-control.mjs')).default
if (!suites.some(s => s.id === surrogate.id)) suites.push(surrogate)

const testById = new Map()
const suiteNameOf = new Map()
for (const s of suites) {
  for (const t of s.tests) {
    testById.set(t.id, t)
    suiteNameOf.set(t.id, s.name)
  }
}
const proxyTests = [...testById.values()].filter(t => t.browser_only !== true)
const kindOf = t => t.kind || 'required'
const totals = { required: 0, optimal: 0, check: 0 }
for (const t of proxyTests) totals[kindOf(t)]++

if (opts.listIds) {
  for (const t of proxyTests) console.log(t.id)
  process.exit(0)
}

// ---- verdicts ---------------------------------------------------------------------
// One of: pass (for checks: "yes"), fail (checks: "no"), dependency, setup,
// retry, harness, untested. Only "pass" counts.
function verdicts (results) {
  const memo = new Map()
  const verdictOf = id => {
    if (memo.has(id)) return memo.get(id)
    const test = testById.get(id)
    const result = results[id]
    let v
    if (result === undefined) v = 'untested'
    else if (test && (test.depends_on || []).some(dep => verdictOf(dep) !== 'pass')) v = 'dependency'
    else if (Array.isArray(result) && result[0] === 'Setup') v = result[1] === 'retry' ? 'retry' : 'setup'
    else if (result === false) v = 'harness'
    else v = result === true ? 'pass' : 'fail'
    memo.set(id, v)
    return v
  }
  return new Map(proxyTests.map(t => [t.id, verdictOf(t.id)]))
}

function score (results) {
  const v = verdicts(results)
  const passes = { required: 0, optimal: 0, check: 0 }
  for (const t of proxyTests) if (v.get(t.id) === 'pass') passes[kindOf(t)]++
  return { passes, verdicts: v }
}

// What the suite said about a test, on one line.
function messageOf (results, id) {
  const r = results[id]
  if (r === undefined) return 'not run'
  if (r === true) return 'passed'
  if (!Array.isArray(r)) return String(r)
  const [kind, text] = r
  const msg = String(text ?? '').replace(/\s+/g, ' ').trim()
  return kind === 'Assertion' ? msg : `${kind}: ${msg}`
}

function describe (results, verdictMap, id) {
  const v = verdictMap.get(id)
  if (v === 'dependency') {
    const failedDeps = testById.get(id).depends_on.filter(d => verdictMap.get(d) !== 'pass' &&
      (results[d] !== undefined || !testById.has(d)))
    const own = results[id] === true ? 'own result: passed' : `own result: ${messageOf(results, id)}`
    return `depends on ${(failedDeps.length ? failedDeps : testById.get(id).depends_on).join(', ')}, not passed (${own})`
  }
  if (v === 'untested') return 'not run (no result in the file)'
  return messageOf(results, id)
}

const readJson = file => {
  let text
  try { text = fs.readFileSync(file, 'utf8') } catch (e) { fail(`cannot read ${file}: ${e.message}`) }
  let data
  try { data = JSON.parse(text) } catch (e) { fail(`${file} is not JSON (${e.message})`) }
  if (!data || typeof data !== 'object' || Array.isArray(data)) fail(`${file} is not a results object`)
  return data
}

// ---- peers bundled with the package ----------------------------------------------
// results/index.mjs lists them; browsers are skipped (they run other tests).
async function loadPeers () {
  const index = (await suiteLoad('results/index.mjs')).default
  const peers = []
  for (const e of index) {
    if (e.type === 'browser') continue
    const file = path.join(suiteDir, 'results', e.file)
    if (!fs.existsSync(file)) continue
    peers.push({ name: e.name, version: e.version, results: readJson(file) })
  }
  return peers
}

// ---- output ---------------------------------------------------------------------
const mine = opts.file ? readJson(opts.file) : null
const peers = opts.peers || opts.crossCheck ? await loadPeers() : []

console.log(`http-cache-tests ${pkgVersion}: ${proxyTests.length} proxy tests ` +
  `(${totals.required} required, ${totals.optimal} optimal, ${totals.check} check)`)

if (mine) {
  const { passes, verdicts: v } = score(mine)
  const notRun = proxyTests.filter(t => v.get(t.id) === 'untested').length
  const unknown = Object.keys(mine).filter(id => !testById.has(id)).length
  console.log('')
  console.log(`${opts.name}:`)
  console.log(`required: ${passes.required} / ${totals.required}`)
  console.log(`optimal: ${passes.optimal} / ${totals.optimal}`)
  console.log(`check (informational, "yes" answers): ${passes.check} / ${totals.check}`)
  if (notRun || unknown) {
    console.log(`WARNING: ${notRun} tests have no result and ${unknown} results are for tests this suite ` +
      `version lacks: the file is partial or from another suite version, so the counts are not comparable.`)
  }

  const failing = kind => proxyTests.filter(t => kindOf(t) === kind && v.get(t.id) !== 'pass')

  const req = failing('required')
  console.log('')
  console.log(`Failing required tests (${req.length}), by suite section:`)
  let section = null
  for (const t of req) {
    if (suiteNameOf.get(t.id) !== section) {
      section = suiteNameOf.get(t.id)
      console.log(`  ${section}`)
    }
    console.log(`    ${t.id}: ${describe(mine, v, t.id)}`)
  }

  // Optimal tests are "should"-level; one short line each is enough.
  const opt = failing('optimal')
  console.log('')
  console.log(`Failing optimal tests (${opt.length}):`)
  for (const t of opt) {
    let msg = v.get(t.id) === 'dependency'
      ? `depends on ${t.depends_on.filter(d => v.get(d) !== 'pass').join(', ')}, not passed`
      : describe(mine, v, t.id)
    if (msg.length > 90) msg = msg.slice(0, 87) + '...'
    console.log(`  ${t.id}: ${msg}`)
  }
}

if (opts.peers) {
  // A peer file may lack some tests (ATS's lacks 29); those count as not
  // passed, as on the site, and the last column says so.
  const row = (name, version, results) => {
    const { passes, verdicts: v } = score(results)
    const notRun = proxyTests.filter(t => v.get(t.id) === 'untested').length
    return [name, version, `${passes.required}/${totals.required}`, `${passes.optimal}/${totals.optimal}`,
      notRun ? `${notRun} tests have no result` : '']
  }
  const cells = [['implementation', 'version', 'required', 'optimal', ''],
    ...(mine ? [row(opts.name, 'this run', mine)] : []),
    ...peers.map(p => row(p.name, p.version, p.results))]
  const w = [0, 1, 2, 3].map(i => Math.max(...cells.map(c => c[i].length)))
  console.log('')
  console.log(`Side by side with the peer results bundled in http-cache-tests ${pkgVersion} ` +
    '(recorded around January 2021, same tests):')
  for (const c of cells) {
    console.log(`  ${c[0].padEnd(w[0])}  ${c[1].padEnd(w[1])}  ${c[2].padStart(w[2])}  ${c[3].padStart(w[3])}  ${c[4]}`.trimEnd())
  }
}

// ---- optional: agree with the suite's own verdicts ---------------------------------
// lib/display.mjs is what cache-tests.fyi renders with; its verdicts are
// [icon, colour, text]. Map the text to ours and compare every test.
if (opts.crossCheck) {
  const { determineTestResult } = await suiteLoad('lib/display.mjs')
  const theirs = {
    '✅': 'pass', '⛔️': 'fail', '⚠️': 'fail', Y: 'pass', N: 'fail', '🔹': 'setup',
    '⁉️': 'harness', '⚪️': 'dependency', '↻': 'retry', '-': 'untested'
  }
  const sets = [...(mine ? [{ name: opts.name, results: mine }] : []), ...peers]
  let compared = 0
  const mismatches = []
  for (const s of sets) {
    const v = verdicts(s.results)
    for (const t of proxyTests) {
      const their = theirs[determineTestResult(suites, t.id, s.results)[2]] ?? 'unknown'
      compared++
      if (their !== v.get(t.id)) mismatches.push(`${s.name} ${t.id}: ours ${v.get(t.id)}, suite's ${their}`)
    }
  }
  console.log('')
  if (mismatches.length) {
    console.log(`Cross-check FAILED: ${mismatches.length} of ${compared} verdicts differ from lib/display.mjs:`)
    for (const m of mismatches) console.log(`  ${m}`)
    process.exit(1)
  }
  console.log(`Cross-check: all ${compared} verdicts (${sets.length} result sets) match the suite's lib/display.mjs.`)
}

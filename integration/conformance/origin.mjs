// Starts the conformance suite's origin server (server/server.mjs of the npm
// package http-cache-tests) so that it listens on 127.0.0.1 only.
//
//   node origin.mjs SUITE_DIR        (port from $npm_config_port, as the suite expects)
//
// Why a wrapper: the suite calls `server.listen(port)`, which binds every
// interface; this runner must stay on loopback. Patching listen() before the
// suite's module loads adds the host without touching the installed package.
import net from 'node:net'
import path from 'node:path'
import { pathToFileURL } from 'node:url'

const suiteDir = process.argv[2]
if (!suiteDir) {
  console.error('usage: node origin.mjs SUITE_DIR')
  process.exit(2)
}

const listen = net.Server.prototype.listen
net.Server.prototype.listen = function (...args) {
  // Only the bare `listen(port[, callback])` form gets a host; anything that
  // already names one (or a path, or an options object) is left alone.
  const portOnly = (typeof args[0] === 'number' || /^\d+$/.test(String(args[0]))) &&
    (args.length === 1 || typeof args[1] === 'function')
  if (portOnly) args.splice(1, 0, '127.0.0.1')
  return listen.apply(this, args)
}

// The suite serves its own files relative to the working directory (the
// runner's readiness probe fetches /package.json), so run from the package.
process.chdir(suiteDir)
await import(pathToFileURL(path.join(suiteDir, 'server', 'server.mjs')).href)

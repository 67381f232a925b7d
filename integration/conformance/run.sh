#!/usr/bin/env bash
# Shield's RFC 9111 conformance run: the public HTTP cache test suite (npm
# package http-cache-tests@0.4.5, the suite behind cache-tests.fyi) run through
# Caddy + Shield configured as a plain shared cache, then scored.
#
#   integration/conformance/run.sh [--out FILE] [--check-floor] [--timeout S] [--keep-logs]
#   integration/conformance/run.sh -i TEST_ID     # one test, with its request/response dump
#
# What it does, all on 127.0.0.1 with ports picked at run time:
#   1. installs the suite once into ${XDG_CACHE_HOME:-$HOME/.cache}/shield-http-cache-tests-0.4.5
#      (outside the checkout; a staging folder renamed into place, so an
#      interrupted install never looks complete);
#   2. starts the suite's origin server;
#   3. builds Caddy with Shield from this checkout (go build ./cmd/caddy), or
#      uses the binary in $SHIELD_CADDY, and starts it with Caddyfile beside
#      this script (or $SHIELD_CONFORMANCE_CADDYFILE);
#   4. runs the suite's client through Caddy, saves the raw results JSON
#      (--out, default a new temporary folder) and prints the score
#      (score.mjs): required and optimal passes, the failing tests, and the
#      peer results bundled with the suite for comparison.
#
# Environment:
#   SHIELD_CADDY                  a Caddy binary to use instead of building ./cmd/caddy
#   SHIELD_CONFORMANCE_CADDYFILE  another Caddyfile (e.g. passthrough.Caddyfile for
#                                 a no-cache baseline); it gets the same variables:
#                                 SHIELD_CONFORMANCE_PORT (listen) and
#                                 SHIELD_CONFORMANCE_ORIGIN_PORT (the suite's origin)
#
# Exit status: 0 when the suite ran (whatever the tests said); 1 when the
# harness failed (install, build, a server not starting, the client crashing)
# or, with --check-floor, when required passes fell below the number in
# ./floor; 2 on a usage error. Only processes this script started are stopped.
set -euo pipefail

SUITE_VERSION=0.4.5
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
  cat >&2 <<'EOF'

Options:
  --out FILE       where to write the raw results JSON (default: a new temporary folder)
  -i, --id ID      run one test and print its request/response dump (no JSON, no score)
  --check-floor    exit 1 if required passes are below integration/conformance/floor
  --timeout S      limit for the client run, in seconds (default 600)
  --keep-logs      keep the run folder (server logs, the client's stderr) even on success
EOF
  exit "${1:-2}"
}

die() { echo "conformance: $*" >&2; exit 1; }
note() { echo "conformance: $*" >&2; }

OUT='' TEST_ID='' CHECK_FLOOR=0 TIMEOUT=600 KEEP_LOGS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || usage; OUT=$2; shift 2 ;;
    --out=*) OUT=${1#*=}; shift ;;
    -i|--id) [ $# -ge 2 ] || usage; TEST_ID=$2; shift 2 ;;
    --id=*) TEST_ID=${1#*=}; shift ;;
    --check-floor) CHECK_FLOOR=1; shift ;;
    --timeout) [ $# -ge 2 ] || usage; TIMEOUT=$2; shift 2 ;;
    --timeout=*) TIMEOUT=${1#*=}; shift ;;
    --keep-logs) KEEP_LOGS=1; shift ;;
    -h|--help) usage 0 ;;
    *) echo "conformance: unknown argument: $1" >&2; usage ;;
  esac
done
[[ $TIMEOUT =~ ^[1-9][0-9]*$ ]] || { echo "conformance: --timeout needs a positive number of seconds" >&2; usage; }
[ -z "$TEST_ID" ] || [ "$CHECK_FLOOR" = 0 ] || { echo "conformance: --check-floor needs a full run, not -i" >&2; usage; }

command -v node >/dev/null || die "node is not installed (the suite is a node program)"
command -v npm >/dev/null || die "npm is not installed (it installs the suite)"

CADDYFILE=${SHIELD_CONFORMANCE_CADDYFILE:-$HERE/Caddyfile}
[ -f "$CADDYFILE" ] || die "no Caddyfile at $CADDYFILE"
CADDYFILE=$(cd "$(dirname "$CADDYFILE")" && pwd)/$(basename "$CADDYFILE")

# The floor is read up front so that a broken floor file fails before a
# 20-second run rather than after it.
FLOOR=''
if [ "$CHECK_FLOOR" = 1 ]; then
  FLOOR=$(tr -d '[:space:]' <"$HERE/floor" 2>/dev/null) || die "cannot read $HERE/floor"
  [[ $FLOOR =~ ^[0-9]+$ ]] || die "$HERE/floor must hold one integer, not '$FLOOR'"
fi

# ---- processes we start, and how they are stopped ------------------------------
# Every PID below is a child of this shell; cleanup stops exactly those (TERM,
# then KILL after ~3 s), on success, on failure and on Ctrl-C.
RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/shield-conformance.XXXXXX")
ORIGIN_PID='' CADDY_PID='' CLIENT_PID='' RUN_OK=0
stop_pid() {
  local pid=$1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$?
  stop_pid "$CLIENT_PID"; CLIENT_PID=''
  stop_pid "$CADDY_PID"; CADDY_PID=''
  stop_pid "$ORIGIN_PID"; ORIGIN_PID=''
  # The binary built here is ~80 MB and rebuilt from the Go cache next time.
  rm -f "$RUN_DIR/caddy"
  # The run folder holds the logs (and the results when --out was not given):
  # keep it when something went wrong or when asked to.
  if [ "$RUN_OK" = 1 ] && [ "$KEEP_LOGS" = 0 ] && [ "$OUT" != "$RUN_DIR/results.json" ]; then
    rm -rf "$RUN_DIR"
  elif [ "$RUN_OK" = 0 ] && [ "$rc" != 0 ] && [ -n "$(ls -A "$RUN_DIR")" ]; then
    note "logs kept in $RUN_DIR"
  elif [ -z "$(ls -A "$RUN_DIR")" ]; then
    rmdir "$RUN_DIR"
  fi
  return "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

# Prints the HTTP status of a GET, or 000 when nothing answers (node only, so
# the runner needs no curl).
http_status() {
  node -e '
    fetch(process.argv[1], { signal: AbortSignal.timeout(3000), redirect: "manual" })
      .then(async r => { await r.arrayBuffer(); console.log(r.status) }, () => console.log("000"))' "$1"
}

# Polls URL until it answers 200, failing early if the process behind it died.
wait_for() {
  local what=$1 url=$2 pid=$3 log=$4
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || { tail -n 30 "$log" >&2; die "$what exited during startup (log: $log)"; }
    [ "$(http_status "$url")" = 200 ] && return 0
    sleep 0.2
  done
  tail -n 30 "$log" >&2
  die "$what did not answer 200 at $url within 20 s (log: $log)"
}

# ---- 1. the suite ----------------------------------------------------------------
CACHE_ROOT=${XDG_CACHE_HOME:-$HOME/.cache}
INSTALL_DIR=$CACHE_ROOT/shield-http-cache-tests-$SUITE_VERSION
SUITE=$INSTALL_DIR/node_modules/http-cache-tests
if [ ! -f "$INSTALL_DIR/.complete" ]; then
  note "installing http-cache-tests@$SUITE_VERSION into $INSTALL_DIR"
  mkdir -p "$CACHE_ROOT"
  # Stage beside the target (same filesystem) so the final rename is atomic.
  STAGE=$(mktemp -d "$CACHE_ROOT/.shield-http-cache-tests-stage.XXXXXX")
  # A package.json of its own stops npm from walking up into a parent project;
  # --ignore-scripts because nothing in the suite needs install scripts.
  printf '{ "name": "shield-conformance-suite", "private": true }\n' >"$STAGE/package.json"
  if ! (cd "$STAGE" && npm install --no-audit --no-fund --omit=dev --ignore-scripts --save-exact \
        "http-cache-tests@$SUITE_VERSION") >"$RUN_DIR/npm.log" 2>&1; then
    tail -n 20 "$RUN_DIR/npm.log" >&2
    rm -rf "$STAGE"
    die "npm install http-cache-tests@$SUITE_VERSION failed"
  fi
  touch "$STAGE/.complete"
  chmod 755 "$STAGE"
  # A stale, incomplete folder (no .complete) is replaced; if another run
  # finished its own install meanwhile, keep that one and drop ours.
  [ -d "$INSTALL_DIR" ] && [ ! -f "$INSTALL_DIR/.complete" ] && rm -rf "$INSTALL_DIR"
  if ! mv -T "$STAGE" "$INSTALL_DIR" 2>/dev/null; then
    rm -rf "$STAGE"
    [ -f "$INSTALL_DIR/.complete" ] || die "could not move the suite into $INSTALL_DIR"
  fi
fi
[ -f "$SUITE/cli.mjs" ] && [ -f "$SUITE/server/server.mjs" ] || die "$SUITE is not the http-cache-tests package (delete $INSTALL_DIR to reinstall)"

# An unknown id makes the suite's client crash with a TypeError; say it plainly.
if [ -n "$TEST_ID" ]; then
  node "$HERE/score.mjs" --suite "$SUITE" --list-ids | grep -qxF -- "$TEST_ID" \
    || die "no proxy test with id '$TEST_ID' (list them: node $HERE/score.mjs --list-ids)"
fi

# ---- 2. ports and the origin server ------------------------------------------------
# Two free loopback ports, held open together so they differ. Another program
# could still take one before we bind it; the startup checks below would then
# fail loudly rather than test the wrong server.
read -r ORIGIN_PORT PROXY_PORT < <(node -e '
  const net = require("net")
  const servers = [net.createServer(), net.createServer()]
  Promise.all(servers.map(s => new Promise(ok => s.listen(0, "127.0.0.1", ok)))).then(() => {
    console.log(servers.map(s => s.address().port).join(" "))
    servers.forEach(s => s.close())
  })')
[[ ${ORIGIN_PORT:-} =~ ^[0-9]+$ && ${PROXY_PORT:-} =~ ^[0-9]+$ ]] || die "could not pick free ports"
ORIGIN_URL=http://127.0.0.1:$ORIGIN_PORT
PROXY_URL=http://127.0.0.1:$PROXY_PORT

# The suite reads its settings from npm_config_* variables, as `npm run` would set them.
npm_config_protocol=http npm_config_port=$ORIGIN_PORT npm_config_pidfile=$RUN_DIR/origin.pid \
  node "$HERE/origin.mjs" "$SUITE" >"$RUN_DIR/origin.log" 2>&1 &
ORIGIN_PID=$!
# The origin serves the package's own files, so /package.json shows it is up.
wait_for "the suite's origin server" "$ORIGIN_URL/package.json" "$ORIGIN_PID" "$RUN_DIR/origin.log"

# ---- 3. Caddy with Shield --------------------------------------------------------------
if [ -n "${SHIELD_CADDY:-}" ]; then
  [ -x "$SHIELD_CADDY" ] || die "SHIELD_CADDY=$SHIELD_CADDY is not an executable file"
  CADDY=$SHIELD_CADDY
else
  command -v go >/dev/null || die "go is not installed (or set SHIELD_CADDY to a Caddy binary with Shield)"
  note "building Caddy with Shield from $REPO (go build ./cmd/caddy)"
  (cd "$REPO" && go build -o "$RUN_DIR/caddy" ./cmd/caddy) >"$RUN_DIR/build.log" 2>&1 \
    || { tail -n 30 "$RUN_DIR/build.log" >&2; die "go build ./cmd/caddy failed"; }
  CADDY=$RUN_DIR/caddy
fi

# Caddy's own state (instance id, autosave) goes to the run folder, not $HOME.
SHIELD_CONFORMANCE_PORT=$PROXY_PORT SHIELD_CONFORMANCE_ORIGIN_PORT=$ORIGIN_PORT \
  XDG_DATA_HOME=$RUN_DIR/caddy-data XDG_CONFIG_HOME=$RUN_DIR/caddy-config \
  "$CADDY" run --config "$CADDYFILE" --adapter caddyfile >"$RUN_DIR/caddy.log" 2>&1 &
CADDY_PID=$!
# A 200 for the origin's /package.json through Caddy shows Caddy is up and
# forwarding to this origin (not to some other server on a reused port).
wait_for "Caddy ($CADDYFILE)" "$PROXY_URL/package.json" "$CADDY_PID" "$RUN_DIR/caddy.log"

# ---- 4. the client -------------------------------------------------------------------
# cli.mjs reads npm_config_base || npm_package_config_base and likewise for the
# id; an empty id must arrive as '' (run everything), so both are set.
TIMEOUT_CMD=()
command -v timeout >/dev/null && TIMEOUT_CMD=(timeout "$TIMEOUT")
[ -n "$TEST_ID" ] || note "running the suite through $PROXY_URL (origin $ORIGIN_URL)"
start=$(date +%s)
(
  cd "$SUITE"
  unset npm_config_id
  export npm_config_base=$PROXY_URL npm_package_config_base=$PROXY_URL npm_package_config_id=$TEST_ID
  exec "${TIMEOUT_CMD[@]}" node --no-warnings cli.mjs
) >"$RUN_DIR/client.out" 2>"$RUN_DIR/client.err" &
CLIENT_PID=$!
# Waiting on a background child (rather than running it in the foreground)
# lets INT/TERM reach our trap at once, which then stops the client too.
rc=0
wait "$CLIENT_PID" || rc=$?
CLIENT_PID=''
elapsed=$(( $(date +%s) - start ))
if [ "$rc" != 0 ]; then
  tail -n 30 "$RUN_DIR/client.err" >&2
  [ "$rc" = 124 ] && die "the client ran past --timeout $TIMEOUT s"
  die "the suite's client failed (exit $rc)"
fi

if [ -n "$TEST_ID" ]; then
  cat "$RUN_DIR/client.out"
  # The client exits 0 even when it crashed inside (it only logs the error).
  grep -q '==== Results' "$RUN_DIR/client.out" || { cat "$RUN_DIR/client.err" >&2; die "no result for $TEST_ID"; }
  RUN_OK=1
  exit 0
fi

# The client prints errors and exits 0, so check that it printed a results object.
node -e '
  const r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"))
  if (!r || typeof r !== "object" || Array.isArray(r) || !Object.keys(r).length) process.exit(1)' \
  "$RUN_DIR/client.out" 2>/dev/null \
  || { tail -n 30 "$RUN_DIR/client.err" >&2; die "the client did not print a JSON results object"; }

[ -n "$OUT" ] || OUT=$RUN_DIR/results.json
mkdir -p "$(dirname "$OUT")"
cp "$RUN_DIR/client.out" "$OUT"

# The servers are no longer needed; stop them before scoring.
stop_pid "$CADDY_PID"; CADDY_PID=''
stop_pid "$ORIGIN_PID"; ORIGIN_PID=''

echo "Ran http-cache-tests $SUITE_VERSION through Caddy ($(basename "$CADDYFILE")) in ${elapsed}s; raw results: $OUT"
echo
# Label the results "Shield" only when they come from Shield's own Caddyfile.
LABEL=Shield
[ "$CADDYFILE" = "$HERE/Caddyfile" ] || LABEL="Caddy + $(basename "$CADDYFILE")"
node "$HERE/score.mjs" --suite "$SUITE" --name "$LABEL" "$OUT" | tee "$RUN_DIR/score.txt" \
  || die "scoring failed"
RUN_OK=1

if [ "$CHECK_FLOOR" = 1 ]; then
  REQUIRED=$(sed -n 's|^required: \([0-9][0-9]*\) / .*|\1|p' "$RUN_DIR/score.txt")
  [[ $REQUIRED =~ ^[0-9]+$ ]] || { RUN_OK=0; die "could not read the required count from the score"; }
  if [ "$REQUIRED" -lt "$FLOOR" ]; then
    echo >&2
    echo "conformance: FLOOR CHECK FAILED: $REQUIRED required tests passed, below the floor of $FLOOR" \
      "(integration/conformance/floor). A change made Shield less conformant; see the failing tests above." >&2
    exit 1
  fi
  echo
  echo "Floor check passed: $REQUIRED required passes >= floor $FLOOR."
fi

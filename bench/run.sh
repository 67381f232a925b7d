#!/usr/bin/env bash
# Shield's benchmark (issue 5): the hit path against Caddy's own ceiling, and
# Shield's memory bound. One command, from the checkout:
#
#   bench/run.sh
#
# It builds Caddy+Shield (./cmd/caddy) and the bench tools from this checkout,
# starts everything on loopback (spare ports), pins every server under test to
# SERVER_CPU and wrk, the loader and the origin to CLIENT_CPU, then:
#
#  throughput  interleaved round by round (the order rotates each round), wrk
#              with CONNS connections for DURATION against
#                respond        Caddy `respond` with the origin's 1 KiB body (the ceiling)
#                shield-hot     Shield hits on one hot key
#                shield-zipf    Shield hits over KEYS keys with a Zipf(ZIPF_S) spread, after warm-up
#                reverse_proxy  Caddy `reverse_proxy` to the origin, no cache
#              req/s, p50, p99, ratio to respond of the same round, server CPU
#              time per request (and its ratio to respond's: steadier than req/s
#              on a busy machine), origin requests and Go allocations per
#              request (whole process, from the admin /metrics); then medians.
#  memory      MEM_ENTRIES distinct 1 KiB entries into a MEM_ZONE zone: peak RSS
#              (VmHWM) against the stored bytes and the idle base RSS.
#  flood       FLOOD_KEYS distinct keys into a FLOOD_ZONE zone: peak RSS against
#              the configured memory (the miss path, so ~15 min for 2 million
#              keys at ~2,200 req/s; FLOOD_KEYS=300000 already shows the plateau).
#
# Needs go, curl, taskset and wrk (apt-get install -y wrk); 2 CPUs or more.
#
# Settings (environment):
#   ROUNDS=5 DURATION=10s CONNS=64 WARMUP=3s  throughput rounds, wrk run length, connections
#   KEYS=10000 ZIPF_S=1.0 SIZE=1024           Zipf key count and exponent, body bytes
#   MEM_ENTRIES=100000 MEM_ZONE=256MiB        memory scenario
#   FLOOD_KEYS=2000000 FLOOD_ZONE=64MiB       flood scenario
#   PARTS="throughput memory flood"           which parts to run
#   PROFILE=0                                 1: after the rounds, CPU and allocation
#                                             profiles of respond, shield-hot and
#                                             shield-zipf (admin /debug/pprof/)
#   PROFILE_SECONDS=10
#   SERVER_CPU=1 CLIENT_CPU=0                 taskset CPU lists
#   RESULTS=bench/results                     where the figures (and profiles) are saved
#   KEEP_WORK=0                               1: keep the scratch folder (configs, logs)
#
# Figures go to stdout and to RESULTS/<time>.txt; progress goes to stderr.
# Only the processes this script started are stopped, on any exit.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"

ROUNDS="${ROUNDS:-5}"
DURATION="${DURATION:-10s}"
CONNS="${CONNS:-64}"
WARMUP="${WARMUP:-3s}"
KEYS="${KEYS:-10000}"
ZIPF_S="${ZIPF_S:-1.0}"
SIZE="${SIZE:-1024}"
MEM_ENTRIES="${MEM_ENTRIES:-100000}"
MEM_ZONE="${MEM_ZONE:-256MiB}"
FLOOD_KEYS="${FLOOD_KEYS:-2000000}"
FLOOD_ZONE="${FLOOD_ZONE:-64MiB}"
PARTS="${PARTS:-throughput memory flood}"
PROFILE="${PROFILE:-0}"
PROFILE_SECONDS="${PROFILE_SECONDS:-10}"
SERVER_CPU="${SERVER_CPU:-1}"
CLIENT_CPU="${CLIENT_CPU:-0}"
RESULTS="${RESULTS:-$HERE/results}"
KEEP_WORK="${KEEP_WORK:-0}"

log() { echo "[bench] $*" >&2; }
die() { echo "[bench] error: $*" >&2; exit 1; }

# ---- tools -------------------------------------------------------------------
command -v go >/dev/null || die "go not found"
command -v taskset >/dev/null || die "taskset not found (package util-linux)"
command -v curl >/dev/null || die "curl not found (apt-get install -y curl)"
if ! command -v wrk >/dev/null; then
	cat >&2 <<-'EOF'
	[bench] error: wrk is not installed; the throughput runs need it.
	[bench]        On Debian/Ubuntu: apt-get update && apt-get install -y wrk
	EOF
	exit 1
fi
ncpu="$(nproc)"
[ "$ncpu" -ge 2 ] || log "warning: $ncpu CPU(s): server and load tool share a core, figures mean little"

# ---- scratch folder, process bookkeeping, cleanup ----------------------------
WORK="$(mktemp -d "${TMPDIR:-/tmp}/shield-bench.XXXXXX")"
PIDS=()
cleanup() {
	local rc=$? pid
	for pid in "${PIDS[@]}"; do
		kill "$pid" 2>/dev/null || true
	done
	for pid in "${PIDS[@]}"; do
		wait "$pid" 2>/dev/null || true
	done
	if [ "$KEEP_WORK" = 1 ] || [ "$rc" -ne 0 ]; then
		log "scratch folder kept: $WORK"
	else
		rm -rf "$WORK"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$RESULTS" "$WORK/bin" "$WORK/xdg"
export XDG_DATA_HOME="$WORK/xdg" XDG_CONFIG_HOME="$WORK/xdg"
STAMP="$(date +%Y%m%d-%H%M%S)"
OUT="$RESULTS/$STAMP.txt"
: >"$OUT"
out() { printf '%s\n' "$*" | tee -a "$OUT"; }

# ---- build -------------------------------------------------------------------
log "building Caddy+Shield, origin and loadgen from $ROOT"
(cd "$ROOT" && go build -o "$WORK/bin/caddy" ./cmd/caddy &&
	go build -o "$WORK/bin/origin" ./bench/origin &&
	go build -o "$WORK/bin/loadgen" ./bench/loadgen)
CADDY="$WORK/bin/caddy"
LOADGEN="$WORK/bin/loadgen"

# client OUTFILE CMD...: run a load tool pinned to CLIENT_CPU (stdout to
# OUTFILE, stderr passes through), tracked so that
# an interrupted run stops it too, and wait for it.
client() {
	local f="$1" pid rc=0
	shift
	taskset -c "$CLIENT_CPU" "$@" >"$f" &
	pid=$!
	PIDS+=("$pid")
	wait "$pid" || rc=$?
	forget "$pid"
	return "$rc"
}

# fill URL PREFIX N [loadgen flags]: GET N distinct keys; sets F_* from loadgen's report.
fill() {
	local url="$1" prefix="$2" n="$3" k v
	shift 3
	unset "${!F_@}"
	client "$WORK/fill.out" "$LOADGEN" fill -base "$url" -prefix "$prefix" -n "$n" -c 32 "$@" ||
		{ cat "$WORK/fill.out" >&2; die "loadgen fill failed"; }
	while IFS='=' read -r k v; do printf -v "F_$k" '%s' "$v"; done < <(grep '=' "$WORK/fill.out")
}

# start NAME CPULIST CMD... : start a pinned process in the background; sets
# START_PID (taskset execs the command, so the PID is the server's own).
start() {
	local name="$1" cpus="$2"
	shift 2
	taskset -c "$cpus" "$@" >"$WORK/$name.log" 2>&1 &
	START_PID=$!
	PIDS+=("$START_PID")
}

# forget PID: drop a process that has ended from the list cleanup stops, so
# that a PID the system reuses later is never signalled.
forget() {
	local keep=() p
	for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
	PIDS=("${keep[@]}")
}

# stop PID: stop one process this script started.
stop() {
	kill "$1" 2>/dev/null || true
	wait "$1" 2>/dev/null || true
	forget "$1"
}

wait_http() { # wait_http URL PID NAME
	local i
	for i in $(seq 1 200); do
		curl -fsS -o /dev/null --max-time 1 "$1" 2>/dev/null && return 0
		kill -0 "$2" 2>/dev/null || { cat "$WORK/$3.log" >&2; die "$3 exited"; }
		sleep 0.05
	done
	cat "$WORK/$3.log" >&2
	die "$3 did not answer at $1"
}

read -r -d '' -a PORTS < <("$LOADGEN" ports 16) || true
[ "${#PORTS[@]}" -eq 16 ] || die "could not find spare ports"
nextport=0
port() { PORT="${PORTS[$nextport]}"; nextport=$((nextport + 1)); }

kib_of() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"; }

# ---- origin ------------------------------------------------------------------
port
ORIGIN_PORT="$PORT"
ORIGIN="http://127.0.0.1:$ORIGIN_PORT"
start origin "$CLIENT_CPU" "$WORK/bin/origin" -addr "127.0.0.1:$ORIGIN_PORT" -size "$SIZE"
ORIGIN_PID="$START_PID"
wait_http "$ORIGIN/__stats" "$ORIGIN_PID" origin
origin_count() { "$LOADGEN" count -url "$ORIGIN"; }

# ---- Caddy configs -----------------------------------------------------------
caddy_globals() { # caddy_globals ADMINPORT
	cat <<-EOF
	{
		admin 127.0.0.1:$1
		persist_config off
		auto_https off
	}
	EOF
}

write_respond() { # PORT ADMIN FILE
	local body
	body="$("$WORK/bin/origin" -size "$SIZE" -print 1)"
	case "$body" in *'`'*) die "origin body contains a backtick" ;; esac
	{
		caddy_globals "$2"
		cat <<-EOF
		http://127.0.0.1:$1 {
			header Content-Type application/json
			respond \`$body\` 200
		}
		EOF
	} >"$3"
}

write_shield() { # PORT ADMIN FILE MEMORY
	{
		caddy_globals "$2"
		cat <<-EOF
		http://127.0.0.1:$1 {
			shield {
				zone bench
				memory $4
				rule /users/* {
					ttl 1h
				}
			}
			reverse_proxy 127.0.0.1:$ORIGIN_PORT
		}
		EOF
	} >"$3"
}

write_rp() { # PORT ADMIN FILE
	{
		caddy_globals "$2"
		cat <<-EOF
		http://127.0.0.1:$1 {
			reverse_proxy 127.0.0.1:$ORIGIN_PORT
		}
		EOF
	} >"$3"
}

# start_caddy NAME WRITER [ARGS...]: sets URL_<NAME>, ADMIN_<NAME>, PID_<NAME>
start_caddy() {
	local name="$1" writer="$2" p a
	shift 2
	port; p="$PORT"
	port; a="$PORT"
	"$writer" "$p" "$a" "$WORK/$name.Caddyfile" "$@"
	start "$name" "$SERVER_CPU" "$CADDY" run --config "$WORK/$name.Caddyfile" --adapter caddyfile
	printf -v "PID_$name" '%s' "$START_PID"
	printf -v "URL_$name" '%s' "http://127.0.0.1:$p"
	printf -v "ADMIN_$name" '%s' "http://127.0.0.1:$a"
	wait_http "http://127.0.0.1:$p/__stats" "$START_PID" "$name"
}

# mallocs ADMINURL: the process's Go heap allocations so far (objects).
mallocs() {
	curl -fsS --max-time 5 "$1/metrics" 2>/dev/null |
		awk '$1 == "go_memstats_mallocs_total" { printf "%.0f\n", $2; found = 1 } END { if (!found) print 0 }'
}

# memstats ADMINURL: one line of the Go heap's figures and Shield's store size, in MiB.
memstats() {
	curl -fsS --max-time 5 "$1/metrics" 2>/dev/null | awk '
	$1 == "go_memstats_heap_alloc_bytes" { a = $2 }
	$1 == "go_memstats_heap_inuse_bytes" { u = $2 }
	$1 == "go_memstats_heap_sys_bytes" { y = $2 }
	$1 == "go_memstats_heap_released_bytes" { r = $2 }
	$1 == "go_memstats_next_gc_bytes" { g = $2 }
	$1 ~ /^caddy_shield_store_bytes/ { st += $2 }
	END { printf "Go heap: live+garbage %.0f, in use %.0f, from OS %.0f (released %.0f), next GC at %.0f; Shield store capacity %.0f (MiB)\n",
		a / 1048576, u / 1048576, y / 1048576, r / 1048576, g / 1048576, st / 1048576 }'
}

# ---- wrk ---------------------------------------------------------------------
to_ms() {
	awk -v s="$1" 'BEGIN {
		v = s + 0
		if (s ~ /us$/) v /= 1000; else if (s ~ /ms$/) v += 0; else if (s ~ /s$/) v *= 1000
		printf "%.2f", v }'
}

# run_wrk URL DURATION [LUA]: sets W_rps W_total W_p50 W_p99 W_errors
run_wrk() {
	local url="$1" dur="$2" lua="${3:-}" f="$WORK/wrk.out" args=()
	[ -n "$lua" ] && args=(-s "$HERE/lua/$lua")
	client "$f" env KEYS="$KEYS" ZIPF_S="$ZIPF_S" PREFIX="/users/" \
		wrk -t1 -c"$CONNS" -d"$dur" --latency "${args[@]}" "$url" || { cat "$f" >&2; die "wrk failed"; }
	W_rps="$(awk '/^Requests\/sec:/ { printf "%.0f", $2 }' "$f")"
	W_total="$(awk '/ requests in / { print $1 }' "$f")"
	W_p50="$(to_ms "$(awk '$1 == "50%" { print $2 }' "$f")")"
	W_p99="$(to_ms "$(awk '$1 == "99%" { print $2 }' "$f")")"
	W_errors="$(awk '/Non-2xx or 3xx responses:/ { n += $NF } /Socket errors:/ { gsub(/,/, ""); n += $4 + $6 + $8 + $10 } END { print n + 0 }' "$f")"
}

CLK_TCK="$(getconf CLK_TCK)"
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; } # utime + stime of PID, in clock ticks
per_req() { # per_req AMOUNT REQUESTS SCALE
	awk -v a="$1" -v t="$2" -v k="$3" 'BEGIN { if (a > 0 && t > 0) printf "%.1f", a * k / t; else print "-" }'
}
col() { awk -v c="$1" '$c != "-" { print $c }' "$2" | median; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.3f", a / b; else print "-" }'; }
median() {
	sort -g | awk '{ v[NR] = $1 } END {
		if (NR == 0) { print "-"; exit }
		if (NR % 2) { print v[(NR + 1) / 2]; exit }
		m = sprintf("%.3f", (v[NR / 2] + v[NR / 2 + 1]) / 2); sub(/\.?0+$/, "", m); print m }'
}

SYSTEMS=(respond shield-hot shield-zipf reverse_proxy)
sys_url() {
	case "$1" in
	respond) echo "$URL_respond/users/1" ;;
	shield-hot) echo "$URL_shield/users/1" ;;
	shield-zipf) echo "$URL_shield" ;;
	reverse_proxy) echo "$URL_rp/users/1" ;;
	esac
}
sys_lua() { [ "$1" = shield-zipf ] && echo zipf.lua || true; }
sys_pid() {
	case "$1" in
	respond) echo "$PID_respond" ;;
	shield-*) echo "$PID_shield" ;;
	reverse_proxy) echo "$PID_rp" ;;
	esac
}
sys_admin() {
	case "$1" in
	respond) echo "$ADMIN_respond" ;;
	shield-*) echo "$ADMIN_shield" ;;
	reverse_proxy) echo "$ADMIN_rp" ;;
	esac
}

out "# Shield benchmark $STAMP"
out "# $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$ROOT" && git diff --quiet HEAD -- . 2>/dev/null || echo ' (with local changes)'), $(go version | awk '{ print $3 }'), $(wrk --version 2>&1 | head -1 | awk '{ print $1, $2 }'), $ncpu CPUs ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo))"
out "# server on CPU $SERVER_CPU; wrk, loader and origin on CPU $CLIENT_CPU; body $SIZE bytes; load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
awk '{ exit !($1 > 1.0) }' /proc/loadavg && log "warning: load average $(cut -d' ' -f1 /proc/loadavg): other work on this machine will skew the figures"

# ---- throughput --------------------------------------------------------------
part_throughput() {
	start_caddy respond write_respond
	start_caddy shield write_shield 256MiB
	start_caddy rp write_rp

	log "warming Shield: $KEYS keys"
	fill "$URL_shield" /users/ "$KEYS"
	fill "$URL_shield" /users/ "$KEYS"
	[ "$F_hits" = "$KEYS" ] || log "warning: only $F_hits of $KEYS keys answered as hits after warm-up"
	curl -fsS -D - -o /dev/null "$URL_shield/users/1" | grep -i '^cache-status' >&2 || true

	for s in "${SYSTEMS[@]}"; do
		log "warm-up run: $s ($WARMUP)"
		run_wrk "$(sys_url "$s")" "$WARMUP" "$(sys_lua "$s")"
	done

	out ""
	out "## Throughput: wrk -t1 -c$CONNS -d$DURATION, $ROUNDS rounds, Zipf s=$ZIPF_S over $KEYS keys"
	local r i n=${#SYSTEMS[@]} order o0 o1 m0 m1 c0 c1 base basecpu v
	local hdr='  %-14s %9s %8s %8s %10s %11s %10s %11s %7s %10s'
	for r in $(seq 1 "$ROUNDS"); do
		order=()
		for i in $(seq 0 $((n - 1))); do order+=("${SYSTEMS[$(((i + r - 1) % n))]}"); done
		for s in "${order[@]}"; do
			log "round $r/$ROUNDS: $s"
			o0="$(origin_count)"
			m0="$(mallocs "$(sys_admin "$s")")"
			c0="$(cpu_ticks "$(sys_pid "$s")")"
			run_wrk "$(sys_url "$s")" "$DURATION" "$(sys_lua "$s")"
			c1="$(cpu_ticks "$(sys_pid "$s")")"
			m1="$(mallocs "$(sys_admin "$s")")"
			o1="$(origin_count)"
			printf -v "R_${s//-/_}" '%s' "$W_rps $W_p50 $W_p99 $((o1 - o0)) $W_errors $(per_req $((m1 - m0)) "$W_total" 1) $(per_req $((c1 - c0)) "$W_total" "$((1000000 / CLK_TCK))")"
		done
		out ""
		out "round $r (order: ${order[*]}; load average $(cut -d' ' -f1 /proc/loadavg))"
		out "$(printf "$hdr" system req/s p50_ms p99_ms x_respond cpu_us/req x_resp_cpu origin_reqs errors allocs/req)"
		read -r base _ _ _ _ _ basecpu <<<"$R_respond"
		for s in "${SYSTEMS[@]}"; do
			v="R_${s//-/_}"
			read -r rps p50 p99 oreq errs apr cpr <<<"${!v}"
			out "$(printf "$hdr" "$s" "$rps" "$p50" "$p99" "$(ratio "$rps" "$base")" "$cpr" "$(ratio "$basecpu" "$cpr")" "$oreq" "$errs" "$apr")"
			echo "$rps $p50 $p99 $(ratio "$rps" "$base") $apr $cpr $(ratio "$basecpu" "$cpr")" >>"$WORK/rounds.$s"
		done
	done

	out ""
	out "medians over $ROUNDS rounds"
	hdr='  %-14s %9s %8s %8s %10s %10s %10s %10s'
	out "$(printf "$hdr" system req/s p50_ms p99_ms x_respond cpu_us/req x_resp_cpu allocs/req)"
	for s in "${SYSTEMS[@]}"; do
		out "$(printf "$hdr" "$s" \
			"$(col 1 "$WORK/rounds.$s")" "$(col 2 "$WORK/rounds.$s")" "$(col 3 "$WORK/rounds.$s")" \
			"$(col 4 "$WORK/rounds.$s")" "$(col 6 "$WORK/rounds.$s")" "$(col 7 "$WORK/rounds.$s")" \
			"$(col 5 "$WORK/rounds.$s")")"
	done
	out "  targets: shield-hot >= 0.95 x respond, shield-zipf >= 0.90 x respond"
	out "  x_respond: req/s over respond's in the same round. cpu_us/req: CPU time of the server process per"
	out "  request (utime+stime, /proc/PID/stat), steadier than req/s when other work shares the machine;"
	out "  x_resp_cpu: respond's cpu_us/req over the system's. allocs/req: Go heap allocations of the whole"
	out "  Caddy process per request (go_memstats_mallocs_total from the admin /metrics)."

	[ "$PROFILE" = 1 ] && profile_all
	stop "$PID_respond"
	stop "$PID_shield"
	stop "$PID_rp"
}

# ---- profiles ----------------------------------------------------------------
profile_all() {
	local s adm wpid tag
	out ""
	out "## Profiles ($PROFILE_SECONDS s under wrk -c$CONNS): $RESULTS/$STAMP-*.prof, tops in $RESULTS/$STAMP-profile.txt"
	for s in respond shield-hot shield-zipf; do
		adm="$(sys_admin "$s")"
		tag="$RESULTS/$STAMP-$s"
		log "profiling $s"
		curl -fsS -o "$tag.allocs0.prof" "$adm/debug/pprof/allocs"
		local lua=()
		[ "$s" = shield-zipf ] && lua=(-s "$HERE/lua/zipf.lua")
		taskset -c "$CLIENT_CPU" env KEYS="$KEYS" ZIPF_S="$ZIPF_S" PREFIX="/users/" \
			wrk -t1 -c"$CONNS" -d"$((PROFILE_SECONDS + 2))s" "${lua[@]}" \
			"$(sys_url "$s")" >"$WORK/wrk-profile.out" 2>&1 &
		wpid=$!
		PIDS+=("$wpid")
		sleep 1
		taskset -c "$CLIENT_CPU" curl -fsS -o "$tag.cpu.prof" "$adm/debug/pprof/profile?seconds=$PROFILE_SECONDS"
		curl -fsS -o "$tag.allocs1.prof" "$adm/debug/pprof/allocs"
		wait "$wpid" || true
		forget "$wpid"
		{
			echo "==== $s: CPU (top 30, cumulative sort follows)"
			go tool pprof -top -nodecount=30 "$CADDY" "$tag.cpu.prof" 2>/dev/null
			echo "==== $s: CPU by cumulative time"
			go tool pprof -top -cum -nodecount=40 "$CADDY" "$tag.cpu.prof" 2>/dev/null
			echo "==== $s: allocations during the run (objects)"
			go tool pprof -top -sample_index=alloc_objects -nodecount=30 -base "$tag.allocs0.prof" "$CADDY" "$tag.allocs1.prof" 2>/dev/null
			echo "==== $s: allocations during the run (bytes)"
			go tool pprof -top -sample_index=alloc_space -nodecount=20 -base "$tag.allocs0.prof" "$CADDY" "$tag.allocs1.prof" 2>/dev/null
		} >>"$RESULTS/$STAMP-profile.txt"
	done
}

# ---- memory ------------------------------------------------------------------
# fill_keys NAME PREFIX N : fill through Caddy NAME, sampling its memory
fill_keys() {
	local pidv="PID_$1" urlv="URL_$1"
	fill "${!urlv}" "$2" "$3" -pid "${!pidv}"
}

part_memory() {
	out ""
	out "## Memory: $MEM_ENTRIES entries of $SIZE bytes into a $MEM_ZONE zone"
	start_caddy mem write_shield "$MEM_ZONE"
	sleep 1
	local base_rss base_hwm o0 o1 resident stored peak
	base_rss="$(kib_of "$PID_mem" VmRSS)"
	base_hwm="$(kib_of "$PID_mem" VmHWM)"
	out "  base (idle Caddy+Shield, empty zone): VmRSS $base_rss KiB, VmHWM $base_hwm KiB"
	log "filling $MEM_ENTRIES entries"
	fill_keys mem /users/m "$MEM_ENTRIES"
	out "  fill: $F_requests requests in ${F_seconds}s ($F_rps req/s), errors $F_errors, non-200 $F_non200"
	log "reading them back"
	o0="$(origin_count)"
	fill_keys mem /users/m "$MEM_ENTRIES"
	o1="$(origin_count)"
	resident=$((MEM_ENTRIES - (o1 - o0)))
	stored=$((resident * SIZE))
	peak="$(kib_of "$PID_mem" VmHWM)"
	out "  read back: $F_hits hits, $((o1 - o0)) origin requests -> $resident entries resident ($((stored / 1024)) KiB of bodies)"
	out "  peak RSS (VmHWM) $peak KiB, RSS now $(kib_of "$PID_mem" VmRSS) KiB"
	out "  $(memstats "$ADMIN_mem")"
	out "  (peak - base) / stored bytes = $(awk -v p="$peak" -v b="$base_hwm" -v s="$stored" 'BEGIN { if (s > 0) printf "%.2f", (p - b) * 1024 / s; else print "-" }')  (target <= 1.5)"
	out "  peak / (1.5 x stored + base) = $(awk -v p="$peak" -v b="$base_hwm" -v s="$stored" 'BEGIN { printf "%.2f", p / (1.5 * s / 1024 + b) }')  (target <= 1)"
	stop "$PID_mem"
}

bytes_of() { # 64MiB -> bytes
	awk -v s="$1" 'BEGIN {
		n = s + 0; u = s; sub(/^[0-9.]+/, "", u)
		m["KiB"] = 1024; m["MiB"] = 1048576; m["GiB"] = 1073741824; m["KB"] = 1000; m["MB"] = 1e6; m["GB"] = 1e9; m[""] = 1; m["B"] = 1
		printf "%.0f", n * m[u] }'
}

part_flood() {
	out ""
	out "## Flood: $FLOOD_KEYS distinct keys of $SIZE bytes into a $FLOOD_ZONE zone"
	start_caddy flood write_shield "$FLOOD_ZONE"
	sleep 1
	local base_hwm peak cfg
	base_hwm="$(kib_of "$PID_flood" VmHWM)"
	cfg="$(bytes_of "$FLOOD_ZONE")"
	out "  base (idle Caddy+Shield, empty zone): VmRSS $(kib_of "$PID_flood" VmRSS) KiB, VmHWM $base_hwm KiB"
	log "flooding $FLOOD_KEYS keys"
	fill_keys flood /users/f "$FLOOD_KEYS"
	peak="$(kib_of "$PID_flood" VmHWM)"
	out "  fill: $F_requests requests in ${F_seconds}s ($F_rps req/s), errors $F_errors, non-200 $F_non200"
	out "  peak RSS (VmHWM) $peak KiB, RSS at the end $F_end_rss_kib KiB; configured $((cfg / 1024)) KiB"
	out "  $(memstats "$ADMIN_flood")"
	out "  peak / configured = $(awk -v p="$peak" -v c="$cfg" 'BEGIN { printf "%.2f", p * 1024 / c }'), (peak - base) / configured = $(awk -v p="$peak" -v b="$base_hwm" -v c="$cfg" 'BEGIN { printf "%.2f", (p - b) * 1024 / c }')  (target <= 1.2)"
	stop "$PID_flood"
}

for part in $PARTS; do
	case "$part" in
	throughput) part_throughput ;;
	memory) part_memory ;;
	flood) part_flood ;;
	*) die "unknown part $part (throughput, memory, flood)" ;;
	esac
done
out ""
log "figures saved in $OUT"

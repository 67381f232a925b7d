package caddymodule

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Cluster mode's part of a fetch. A flight (one per key per instance, so
// thousands of local waiters make one attempt) first runs acquireScript: one
// Lua call that returns the L2 entry when it is fresh, or takes the fleet
// lock for the key (random token, lease renewed by the holder), or says
// another instance holds it. The holder takes the fleet budget, fetches, and
// clusterFinish writes the entry to L2, releases the lock and publishes the
// release; followers wake on it (or poll, if the message is lost), and read
// L2, or take the lock over once the holder's lease ran out.

// heldFlights maps a flight to its cluster state, from clusterBeforeFetch to clusterFinish.
var heldFlights sync.Map // *flight → *flightCluster

type flightCluster struct {
	zc      *zoneCluster
	lockKey string // the fleet lock held, "" when none
	token   string
	l1Only  bool // L2 said this URL's body is above max_l2_object_size
	// fallback is a stale copy L2 holds, for a flight with none of its own:
	// answered when the origin fails, within its stale-if-error window.
	fallback *entry
}

// staleFromL2 decodes a stale entry L2 sent and keeps it in L1, so that this
// instance too can answer it while the origin fails or the key refreshes. An
// entry L2 holds as stale (soft-purged, or fresh by a clock ahead of ours)
// stays stale here.
func (z *zone) staleFromL2(recKey, payload string) *entry {
	e, err := decodeEntry([]byte(payload))
	if err != nil {
		return nil
	}
	now := time.Now()
	if e.freshFor(now) > 0 {
		e.softPurged = true
	}
	if !e.withinStaleWindow(now, max(e.swr, e.sie)) {
		return nil
	}
	_ = z.store.set(recKey, encodeEntry(e))
	return e
}

// Lookup results of acquireScript.
const (
	lookHit    = "hit"    // the fresh entry from L2
	lookSpec   = "spec"   // the URL varies: the vary spec, to select the variant
	lookMarker = "marker" // "l1" (fetch a local copy), "large" or "u:<reason>" (not storable)
	lookLock   = "lock"   // the fleet lock is ours, and the fleet token: fetch
	lookWait   = "wait"   // another instance fetches: wait (PTTL of its lease)
	lookBudget = "budget" // the key is free but the fleet budget is spent: no lock taken
	lookStale  = "stale"  // a stale entry within its stale-while-revalidate window: answer it, refresh in the background
)

// failureShare is how long an origin failure stays in L2 for the fleet: the
// instances waiting on the failed fetch take its answer instead of each
// asking the origin in turn, and for this long so do new requests.
const failureShare = time.Second

// acquireScript: KEYS rec, lock, marker, primary rec, GCRA key; ARGV token,
// lease (ms), now (ms, the caller's clock, as the entries' fresh-until), the
// caller's vary spec ("" when it looks up the primary), then the GCRA
// arguments (gcraFn; an empty interval when the rate is unlimited), then
// whether a stale entry is wanted ("1": the caller has no stale copy of its
// own). The lock and the token are taken together, or neither: a miss the
// budget refuses costs one call and leaves no lock to release. Replies
// {kind, a, b[, stale entry]}: a stale entry within its stale-while-revalidate
// window is the answer (stale); past it, it rides along with marker, budget
// and lock, as the fallback when the origin fails.
var acquireScript = redis.NewScript(gcraFn + `
if KEYS[4] ~= KEYS[1] then
	local s = redis.call('HGET', KEYS[4], 's')
	if s and s ~= ARGV[4] then return {'spec', s, ''} end
end
local r = redis.call('HMGET', KEYS[1], 'f', 'e', 's', 'w')
if r[3] then return {'spec', r[3], ''} end
local now = tonumber(ARGV[3])
if r[2] and tonumber(r[1] or '0') > now then return {'hit', r[2], ''} end
local stale = ''
if r[2] and ARGV[9] == '1' then
	if tonumber(r[4] or '0') > now then return {'stale', r[2], ''} end
	stale = r[2]
end
local m = redis.call('GET', KEYS[3])
if m then return {'marker', m, '', stale} end
local pttl = redis.call('PTTL', KEYS[2])
if pttl ~= -2 then return {'wait', string.format('%d', pttl), ''} end
local delay, tokens = 0, 0
if ARGV[5] ~= '' then
	local ok
	ok, delay, tokens = gcra(KEYS[5], tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]))
	if not ok then
		return {'budget', string.format('%d', math.floor(delay)), string.format('%d', math.floor(tokens * 1000)), stale}
	end
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return {'lock', string.format('%d', math.floor(delay)), string.format('%d', math.floor(tokens * 1000)), stale}
`)

// finishScript: KEYS rec, lock, marker, primary rec, variant set, tag sets...;
// ARGV token ("" when no lock is held), mode (entry, marker or unlock),
// payload (the encoded entry or the marker), fresh-until (ms), TTL (ms),
// vary spec ("" when none), notify channel, stale-while-revalidate-until (ms).
var finishScript = redis.NewScript(`
local mode = ARGV[2]
local ttl = tonumber(ARGV[5])
local function extend(k)
	if redis.call('PTTL', k) < ttl then redis.call('PEXPIRE', k, ttl) end
end
if mode == 'entry' then
	redis.call('DEL', KEYS[1])
	redis.call('HSET', KEYS[1], 'f', ARGV[4], 'e', ARGV[3], 'w', ARGV[8])
	redis.call('PEXPIRE', KEYS[1], ttl)
	redis.call('DEL', KEYS[3])
	if ARGV[6] ~= '' then
		redis.call('HDEL', KEYS[4], 'f', 'e')
		redis.call('HSET', KEYS[4], 's', ARGV[6])
		extend(KEYS[4])
		redis.call('SADD', KEYS[5], KEYS[1])
		extend(KEYS[5])
	end
	for i = 6, #KEYS do
		redis.call('SADD', KEYS[i], KEYS[1])
		extend(KEYS[i])
	end
elseif mode == 'marker' then
	redis.call('SET', KEYS[3], ARGV[3], 'PX', ttl)
end
if ARGV[1] ~= '' then
	if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
	redis.call('PUBLISH', ARGV[7], KEYS[2])
end
return 1
`)

// clusterBeforeFetch runs at the start of zone.fetch, before the budget is
// taken. It returns true with res filled when the fetch is settled without the
// origin (an L2 hit, a marker, a wait that ran out, no budget); otherwise the
// fleet lock is held (or Redis is unreachable) and job.release holds the
// budget taken: the fetch goes on.
func (z *zone) clusterBeforeFetch(job *fetchJob, f *flight, res *fetchResult) bool {
	zc := z.clusterOf()
	if zc == nil {
		return false
	}
	start := time.Now()
	ctx, cancel := context.WithTimeout(z.ctx, job.pol.maxWait)
	defer cancel()
	if !job.background {
		f.mu.Lock()
		f.abandon = cancel // nobody waits any more: stop waiting for the lock or the budget
		nobody := f.waiters <= 0
		f.mu.Unlock()
		if nobody {
			cancel()
		}
	}
	giveBack := func() {
		if job.release != nil {
			job.release() // a background refresh's precheck (clusterBudget.tryBackground)
		}
	}
	reject := func(retryAfter time.Duration) bool {
		giveBack()
		if !job.background {
			z.metrics.wait.Observe(time.Since(start).Seconds())
			z.metrics.rejected.Inc()
		}
		res.err, res.retryAfter = errOriginBudget, retryAfter
		return true
	}
	b := z.budget.(*clusterBudget)
	fc := &flightCluster{zc: zc}
	degraded := !zc.cl.healthy()
	fleetBudget := zc.cl.fleetBudgetReady() // else the local share: degraded, or just rejoined
	var grant *gcraResult                   // the token taken with the lock
	if !degraded {
		kind, val, err := z.clusterLookup(ctx, zc, job, f, fc, b, fleetBudget)
		switch {
		case err != nil && ctx.Err() != nil:
			// Waited max_wait for another instance's fetch, or every client left.
			giveBack()
			res.err = errOriginTimeout
			return true
		case err != nil:
			zc.metrics.lookupError()
			degraded = true
		case kind == lookHit:
			giveBack()
			e := val.(*entry)
			res.resp, res.status, res.stored, res.shareable, res.cluster = e, e.status, true, true, clusterL2Hit
			return true
		case kind == lookStale:
			// Stale in L2 within its stale-while-revalidate window: every
			// waiter answers it and starts the (one) background refresh.
			giveBack()
			e := val.(*entry)
			res.resp, res.status, res.stored, res.shareable, res.cluster = e, e.status, true, true, clusterL2Stale
			return true
		case kind == lookMarker && strings.HasPrefix(val.(string), "f:"):
			// The fetch another instance made failed moments ago: its answer, not another try.
			giveBack()
			shareFailure(res, strings.TrimPrefix(val.(string), "f:"))
			res.fallback = fc.fallback
			return true
		case kind == lookBudget:
			b.fleet.Store(true)
			return reject(max(val.(gcraResult).wait, time.Second))
		case kind == lookLock && fleetBudget:
			g := val.(gcraResult)
			grant = &g
		case kind == lookMarker && val.(string) == "large":
			giveBack()
			z.hints.set(job.primary, time.Now().Add(job.pol.uncacheableHint))
			res.err, res.cluster = errTooLarge, clusterL2Marker
			return true
		case kind == lookMarker && strings.HasPrefix(val.(string), "u:"):
			// Another instance found the URL not storable: every waiter asks on its own.
			giveBack()
			z.hints.set(job.primary, time.Now().Add(job.pol.uncacheableHint))
			res.reason, res.owner, res.cluster = strings.TrimPrefix(val.(string), "u:"), nil, clusterL2Marker
			return true
		case kind == lookMarker:
			fc.l1Only = true // too large for L2: fetch a local copy, without the lock
		}
	}

	var (
		release     func()
		retryAfter  time.Duration
		redisFailed bool
		err         error
	)
	switch {
	case grant != nil:
		release, retryAfter, redisFailed, err = zc.afterLock(ctx, b, *grant, job.background)
	case !degraded && !fleetBudget:
		// Just rejoined: the local share a little longer (rejoinGrace).
		release, retryAfter, err = b.graceAcquire(ctx, job.background)
	case job.background:
		var ok bool
		if release, ok = zc.backgroundBudget(ctx, b, !degraded); !ok {
			err = errOriginBudget
		}
	default:
		release, retryAfter, redisFailed, err = zc.acquireBudget(ctx, b, !degraded)
	}
	degraded = degraded || redisFailed
	if err != nil {
		heldFlights.Store(f, fc) // clusterFinish releases the lock
		return reject(retryAfter)
	}
	if !job.background {
		z.metrics.wait.Observe(time.Since(start).Seconds())
	}
	if prev := job.release; prev != nil {
		job.release = func() { release(); prev() }
	} else {
		job.release = release
	}
	if degraded {
		zc.metrics.degradedFetch()
		res.cluster = clusterDegraded
	}
	if fc.fallback != nil && job.stale == nil {
		// Revalidate L2's stale copy, and answer it if the origin fails.
		job.stale, res.fallback = fc.fallback, fc.fallback
		setValidators(job.req.Header, fc.fallback)
	}
	heldFlights.Store(f, fc)
	return false
}

// failureMarker is what L2 keeps of a failed fetch for failureShare: the
// origin's 5xx answer ("r:" and the encoded response, when it fits), or
// what went wrong ("e:timeout", "e:error", "s:<status>").
func failureMarker(res *fetchResult, maxL2 int64) (string, bool) {
	switch {
	case res.err == nil && res.status >= 500 && res.resp != nil:
		if enc := encodeEntry(res.resp); int64(len(enc)) <= min(maxL2, 64<<10) {
			return "f:r:" + string(enc), true
		}
		return "f:s:" + strconv.Itoa(res.status), true
	case errors.Is(res.err, errOriginTimeout):
		return "f:e:timeout", true
	case res.err != nil && !errors.Is(res.err, errOriginBudget) && !errors.Is(res.err, errTooLarge) &&
		!errors.Is(res.err, errZoneClosed) && !errors.Is(res.err, errTruncated):
		return "f:e:error", true
	}
	return "", false
}

// shareFailure fills a result from another instance's failure marker.
func shareFailure(res *fetchResult, marker string) {
	res.cluster, res.shareable, res.owner = clusterL2Marker, true, nil
	kind, rest, _ := strings.Cut(marker, ":")
	switch kind {
	case "r":
		if e, err := decodeEntry([]byte(rest)); err == nil {
			res.resp, res.status, res.reason = e, e.status, "origin-error"
			return
		}
	case "s":
		if code, err := strconv.Atoi(rest); err == nil && code >= 500 && code < 600 {
			res.err, res.status = fmt.Errorf("origin answered %d on another instance", code), code
			return
		}
	case "e":
		if rest == "timeout" {
			res.err = errOriginTimeout
			return
		}
	}
	res.err = errors.New("origin fetch failed on another instance")
}

// clusterLookup runs acquireScript for the flight's key until it has an
// answer other than wait: following the URL's vary spec to the variant,
// waiting for the holder's release (or polling) while another instance
// fetches. val is the *entry of a hit, the marker string, or the gcraResult
// of lock and budget.
func (z *zone) clusterLookup(ctx context.Context, zc *zoneCluster, job *fetchJob, f *flight, fc *flightCluster, b *clusterBudget, fleetBudget bool) (kind string, val any, err error) {
	recKey, primary := job.key, job.primary
	var spec string
	if recKey != primary {
		if raw, err := z.store.bc.Get(primary); err == nil && entryKind(raw) == kindVarySpec {
			spec = string(raw)
		}
	}
	token := randomToken(16)
	lease := msString(zc.cl.cfg.lease)
	poll := 20 * time.Millisecond
	waited, woken := false, false
	wantStale := !job.background && job.stale == nil
	for specs := 0; ; {
		lockKey := zc.lockPrefix + recKey
		wake, done := zc.cl.notify.subscribe(lockKey) // before asking: a release right after is not missed
		args := append([]any{token, lease, time.Now().UnixMilli(), spec}, zc.gcraArgs(ctx, b, job.background, fleetBudget)...)
		staleFlag := ""
		if wantStale {
			staleFlag = "1"
		}
		args = append(args, staleFlag)
		var reply []string
		err := zc.cl.call(ctx, func(ctx context.Context) error {
			var err error
			reply, err = acquireScript.Run(ctx, zc.cl.rdb,
				[]string{zc.recPrefix + recKey, lockKey, zc.markPrefix + primary, zc.recPrefix + primary, zc.gcraKey},
				args...).StringSlice()
			return err
		})
		if err == nil && len(reply) != 3 && len(reply) != 4 {
			err = errors.New("cluster: unexpected lookup reply")
		}
		if err != nil {
			done()
			return "", nil, err
		}
		kind, payload := reply[0], reply[1]
		if kind != lookWait {
			done()
		}
		if len(reply) == 4 && reply[3] != "" {
			fc.fallback = z.staleFromL2(recKey, reply[3])
		}
		switch kind {
		case lookStale:
			if e := z.staleFromL2(recKey, payload); e != nil && e.withinStaleWindow(time.Now(), e.swr) {
				zc.metrics.hit()
				return lookStale, e, nil
			}
			// Not usable here after all (clocks apart): fetch, holding the lock.
			wantStale = false
			continue
		case lookSpec:
			vs, ok := decodeVarySpec([]byte(payload))
			if specs++; !ok || specs > 3 {
				fc.l1Only = true // cannot follow it: fetch a local copy
				return lookMarker, "l1", nil
			}
			_ = z.store.set(primary, []byte(payload))
			spec = payload
			recKey, _ = varyKey(primary, vs, job.req.Header)
			continue
		case lookHit:
			raw := []byte(payload)
			e, derr := decodeEntry(raw)
			if derr != nil || e.freshFor(time.Now()) <= 0 {
				fc.l1Only = true // unusable: fetch a local copy
				return lookMarker, "l1", nil
			}
			_ = z.store.set(recKey, raw)
			zc.metrics.hit()
			return lookHit, e, nil
		case lookMarker:
			zc.metrics.marker()
			return lookMarker, payload, nil
		case lookBudget, lookLock:
			g := parseGrant(kind == lookLock, payload, reply[2])
			if perSecond, _, _ := b.numbers(); perSecond > 0 {
				zc.snap.setTokens(g.tokens, time.Now())
			}
			if kind == lookBudget {
				zc.metrics.budgetRefused()
				return lookBudget, g, nil
			}
			fc.lockKey, fc.token = lockKey, token
			zc.cl.renew.addLock(lockKey, token)
			if waited && !woken {
				zc.metrics.takeover() // the holder's lease ran out without a release
				if ce := z.log().Check(zapcore.DebugLevel, "cluster: took over a fetch"); ce != nil {
					ce.Write(zap.String("zone", z.shape.name))
				}
			}
			zc.metrics.locked()
			return lookLock, g, nil
		case lookWait:
		default:
			done()
			return "", nil, errors.New("cluster: unexpected lookup reply")
		}
		// Another instance is fetching.
		if !waited {
			waited = true
			zc.metrics.waited()
			f.markStarted() // the origin is being asked, elsewhere: a timeout is the origin's
		}
		d := poll
		if pttl, perr := strconv.ParseInt(payload, 10, 64); perr == nil && pttl >= 0 {
			d = min(d, time.Duration(pttl+5)*time.Millisecond)
		}
		t := time.NewTimer(d)
		select {
		case <-wake:
			woken = true
		case <-t.C:
			woken = false
			poll = min(2*poll, 250*time.Millisecond)
		case <-ctx.Done():
			t.Stop()
			done()
			return "", nil, ctx.Err()
		}
		t.Stop()
		done()
	}
}

// gcraArgs are acquireScript's budget arguments for a fetch: a miss reserves
// a token up to budgetWait ahead, a refresh takes one only now, with a reserve left.
func (zc *zoneCluster) gcraArgs(ctx context.Context, b *clusterBudget, background, fleetBudget bool) []any {
	perSecond, burst, _ := b.numbers()
	if perSecond <= 0 || !fleetBudget {
		return []any{"", 0, 0, 0}
	}
	maxDelay, reserve := zc.tokenTerms(ctx, burst, background)
	return []any{strconv.FormatFloat(1e6/perSecond, 'f', 3, 64), burst, maxDelay.Microseconds(), reserve}
}

func parseGrant(ok bool, delay, tokens string) gcraResult {
	d, _ := strconv.ParseInt(delay, 10, 64)
	t, _ := strconv.ParseInt(tokens, 10, 64)
	return gcraResult{ok: ok, wait: time.Duration(d) * time.Microsecond, tokens: float64(t) / 1000}
}

// clusterFinish runs after a flight's result is published: it shares what
// the fetch stored through L2 (or marks the URL), releases the fleet lock and
// wakes the instances waiting on it. Off the clients' path.
func (z *zone) clusterFinish(job fetchJob, f *flight, res *fetchResult) {
	v, ok := heldFlights.LoadAndDelete(f)
	if !ok {
		return
	}
	fc := v.(*flightCluster)
	zc := fc.zc
	if fc.token != "" {
		zc.cl.renew.removeLock(fc.lockKey)
	}
	now := time.Now()
	mode, payload, written := "unlock", "", ""
	var recKey, spec string
	var freshUntil, swrUntil int64
	var ttl time.Duration
	var tags []string
	switch {
	case res.stored && res.resp != nil && !res.cluster.fromL2():
		e := res.resp
		zc.observeFetch(e.fetchDuration)
		recKey, spec = z.clusterRecordKey(job, res)
		encoded := encodeEntry(e)
		if fc.l1Only || int64(len(encoded)) > zc.cl.cfg.maxL2 {
			// Too large for L2: the others fetch their own copy rather than wait for one.
			mode, payload, written = "marker", "l1", "l1_only"
			ttl = max(e.freshFor(now), time.Second)
			break
		}
		mode, payload, written = "entry", string(encoded), "stored"
		fresh := e.freshFor(now)
		if fresh > 0 {
			freshUntil = now.Add(fresh).UnixMilli()
		}
		if e.swr > 0 && !e.mustRevalidate {
			swrUntil = now.Add(fresh + e.swr).UnixMilli()
		}
		ttl = max(e.keepFor(), time.Second) // ends with the entry's longest stale window
		tags = e.tags
	case errors.Is(res.err, errTooLarge) && !res.cluster.fromL2():
		mode, payload, written, ttl = "marker", "large", "marker", job.pol.uncacheableHint
	case res.err == nil && !res.stored && !res.cluster.fromL2() && res.status < 500 && urlUncacheable(res.reason):
		mode, payload, written, ttl = "marker", "u:"+res.reason, "marker", job.pol.uncacheableHint
	case !res.cluster.fromL2() && fc.token != "":
		// Only the lock holder speaks for the fleet: a degraded fetch's failure is its own.
		if m, ok := failureMarker(res, zc.cl.cfg.maxL2); ok {
			mode, payload, written, ttl = "marker", m, "failure", failureShare
		}
	}
	if (fc.token == "" && mode == "unlock") || !zc.cl.healthy() {
		return // nothing to say; or Redis is unreachable, and the lease runs out on its own
	}
	if recKey == "" {
		recKey = job.key
	}
	keys := []string{zc.recPrefix + recKey, fc.lockKey, zc.markPrefix + job.primary,
		zc.recPrefix + job.primary, zc.varPrefix + job.primary}
	if keys[1] == "" {
		keys[1] = zc.lockPrefix + recKey // unused: no token
	}
	for _, t := range tags {
		keys = append(keys, zc.tagPrefix+t)
	}
	err := zc.cl.call(zc.cl.ctx, func(ctx context.Context) error {
		return finishScript.Run(ctx, zc.cl.rdb, keys, fc.token, mode, payload,
			freshUntil, max(ttl.Milliseconds(), 1), spec, zc.cl.key("notify"), swrUntil).Err()
	})
	switch {
	case err != nil && written != "":
		zc.metrics.wrote("error")
		if ce := z.log().Check(zapcore.DebugLevel, "cluster: L2 write failed"); ce != nil {
			ce.Write(zap.String("zone", z.shape.name), zap.Error(err))
		}
	case written != "":
		zc.metrics.wrote(written)
	}
}

// clusterRecordKey is the L1 key settle stored the entry under, and the
// URL's vary spec when the entry is a variant.
func (z *zone) clusterRecordKey(job fetchJob, res *fetchResult) (recKey, spec string) {
	if res.revalid {
		recKey = job.key
	} else {
		recKey = job.primary
	}
	if len(varyNames(res.resp.header)) == 0 {
		return recKey, ""
	}
	raw, err := z.store.bc.Get(job.primary)
	if err != nil || entryKind(raw) != kindVarySpec {
		return recKey, ""
	}
	vs, ok := decodeVarySpec(raw)
	if !ok {
		return recKey, ""
	}
	if !res.revalid {
		recKey, _ = varyKey(job.primary, vs, job.req.Header)
	}
	return recKey, string(raw)
}

// urlUncacheable says whether a reason not to store belongs to the URL (so
// other instances should not wait for it) rather than to one request.
func urlUncacheable(reason string) bool {
	switch reason {
	case "", "authorization", "request-no-store":
		return false
	}
	return true
}

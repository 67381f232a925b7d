package caddymodule

import (
	"context"
	"errors"
	"math"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"golang.org/x/time/rate"
)

// clusterBudget is every zone's origin budget. Without a cluster it is the
// local budget. In cluster mode origin_rate/origin_burst are enforced for the
// whole fleet by GCRA on Redis's clock, and origin_concurrency as leased
// slots in a sorted set; when Redis cannot be reached each instance falls
// back to its local budget, configured with its share (budget/N, N the live
// members last seen) or the whole budget (fallback local).
type clusterBudget struct {
	local *budget
	zc    atomic.Pointer[zoneCluster] // nil: not in cluster mode
	// fleet is true while the last decision came from Redis: the first
	// fallback after it empties the local bucket (see fallback).
	fleet atomic.Bool
	// owed lists the recent grants of the local share: they are charged to
	// the fleet bucket when Redis answers again (rejoinBudget).
	owed localGrants

	mu          sync.Mutex // guards the numbers below: the budget as configured, for the fleet
	perSecond   float64
	burst       int
	concurrency int
}

func newZoneBudget() *clusterBudget { return &clusterBudget{local: newBudget()} }

// attach switches the budget to a cluster (or back to local with nil).
func (b *clusterBudget) attach(zc *zoneCluster) {
	b.zc.Store(zc)
	if zc != nil {
		zc.budget.Store(b)
	}
	b.applyShare()
}

func (b *clusterBudget) configure(perSecond float64, burst, concurrency int) {
	b.mu.Lock()
	b.perSecond, b.burst, b.concurrency = perSecond, burst, concurrency
	b.mu.Unlock()
	b.applyShare()
}

func (b *clusterBudget) numbers() (perSecond float64, burst, concurrency int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.perSecond, b.burst, b.concurrency
}

// applyShare configures the local budget: the whole budget without a
// cluster, else the share this instance falls back to.
func (b *clusterBudget) applyShare() {
	perSecond, burst, concurrency := b.numbers()
	zc := b.zc.Load()
	if zc == nil {
		b.local.configure(perSecond, burst, concurrency)
		return
	}
	n := zc.cl.shareDivisor()
	if n > 1 {
		// Rounded down (at least one each), so the shares never add up to more than the budget.
		perSecond /= float64(n)
		burst = max(1, burst/n)
		if concurrency > 0 {
			concurrency = max(1, concurrency/n)
		}
	}
	b.local.configure(perSecond, burst, concurrency)
}

func (b *clusterBudget) acquire(ctx context.Context) (release func(), retryAfter time.Duration, err error) {
	zc := b.zc.Load()
	if zc == nil {
		return b.local.acquire(ctx)
	}
	release, retryAfter, _, err = zc.acquireBudget(ctx, b, zc.cl.fleetBudgetReady())
	return release, retryAfter, err
}

// tryBackground answers at once, without Redis: in cluster mode it only
// says whether the fleet's last known state leaves a token and a slot beyond
// the reserve; the refresh takes its budget after it wins the fleet lock
// (zoneCluster.backgroundBudget), so instances that find the key already
// refreshed by another one spend nothing.
func (b *clusterBudget) tryBackground() (release func(), ok bool) {
	zc := b.zc.Load()
	if zc == nil {
		return b.local.tryBackground()
	}
	if !zc.cl.fleetBudgetReady() {
		return func() {}, localCanBackground(b.local)
	}
	perSecond, burst, concurrency := b.numbers()
	return func() {}, zc.snap.allowsBackground(perSecond, burst, concurrency)
}

func (b *clusterBudget) available() bool {
	zc := b.zc.Load()
	if zc == nil || !zc.cl.fleetBudgetReady() {
		return b.local.available()
	}
	perSecond, burst, concurrency := b.numbers()
	return zc.snap.available(perSecond, burst, concurrency)
}

func (b *clusterBudget) retryAfter() time.Duration {
	zc := b.zc.Load()
	if zc == nil || !zc.cl.fleetBudgetReady() {
		return b.local.retryAfter()
	}
	perSecond, burst, _ := b.numbers()
	return zc.snap.retryAfter(perSecond, burst)
}

func (b *clusterBudget) tokens() float64 {
	zc := b.zc.Load()
	if zc == nil || !zc.cl.fleetBudgetReady() {
		return b.local.tokens()
	}
	perSecond, burst, _ := b.numbers()
	if perSecond <= 0 {
		return math.Inf(1)
	}
	return zc.snap.tokens(perSecond, burst, time.Now())
}

// inFlight counts this instance's fetches: the local budget counts the
// fleet's grants too (granted).
func (b *clusterBudget) inFlight() int { return b.local.inFlight() }

// fallback takes the local share after a Redis failure (or while the breaker
// is open). Switching from the fleet to the local bucket leaves it this
// instance's share of the tokens the fleet had when Redis last answered,
// when that was within the last second (an idle fleet keeps serving misses
// at once), and none otherwise; and it pushes its next token past the fleet's
// last known reservation: the fleet may have spent its burst this second and
// granted tokens up to max_wait ahead, and every share starts after those.
func (b *clusterBudget) fallback() *budget {
	zc := b.zc.Load()
	if b.fleet.Swap(false) {
		keep := 0
		if perSecond, burst, _ := b.numbers(); zc != nil && perSecond > 0 {
			now := time.Now()
			n := float64(zc.cl.shareDivisor())
			if fleet, ok := zc.snap.recentTokens(perSecond, burst, now, time.Second); ok && fleet >= n {
				keep = int(fleet / n)
			}
			drainLimiterTo(b.local, keep)
			if ahead := -zc.snap.tokens(perSecond, burst, now); ahead > 0 {
				indebt(b.local, int(math.Ceil(ahead/n)))
			}
		} else {
			drainLimiterTo(b.local, 0)
		}
	}
	if zc != nil {
		zc.metrics.fallback()
	}
	return b.local
}

// indebt takes n tokens from a local bucket, into debt.
func indebt(b *budget, n int) {
	lim := b.limiter()
	if lim.Limit() == rate.Inf {
		return
	}
	now := time.Now()
	for range n {
		lim.ReserveN(now, 1)
	}
}

// fallbackAcquire and fallbackBackground take the local share; what they
// grant is owed to the fleet, and paid on rejoin (rejoinBudget).
func (b *clusterBudget) fallbackAcquire(ctx context.Context) (release func(), retryAfter time.Duration, err error) {
	id := b.owed.add() // noted while it waits for its token: a rejoin meanwhile must count it
	// A local token is reserved at most localWait ahead, so that a rejoining
	// fleet knows when the last local grant can run (rejoinBudget).
	ctx, cancel := context.WithTimeout(ctx, localWait)
	defer cancel()
	release, retryAfter, err = b.fallback().acquire(ctx)
	if err != nil {
		b.owed.remove(id)
	}
	return release, retryAfter, err
}

func (b *clusterBudget) fallbackBackground() (release func(), ok bool) {
	release, ok = b.fallback().tryBackground()
	if ok {
		b.owed.add()
	}
	return release, ok
}

// graceAcquire takes the local share right after a rejoin; the fleet's
// barrier (rejoinBudget) already accounts for it.
func (b *clusterBudget) graceAcquire(ctx context.Context, background bool) (release func(), retryAfter time.Duration, err error) {
	if background {
		release, ok := b.fallback().tryBackground()
		if !ok {
			return nil, 0, errOriginBudget
		}
		return release, 0, nil
	}
	ctx, cancel := context.WithTimeout(ctx, localWait)
	defer cancel()
	return b.fallback().acquire(ctx)
}

// owedWindow is how long a local grant stays owed to the fleet: a second (the
// fleet's budget is per second) plus the longest a reserved token waits.
const owedWindow = 2 * time.Second

// localWait bounds how long a miss waits for a token of the local share,
// and so how far ahead the local shares have granted when Redis returns.
const localWait = 250 * time.Millisecond

// localGrants are the local share's recent grants, by when they were asked for.
type localGrants struct {
	mu   sync.Mutex // guards next and at
	next uint64
	at   map[uint64]time.Time
}

func (g *localGrants) add() uint64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.at == nil {
		g.at = make(map[uint64]time.Time)
	}
	g.next++
	g.at[g.next] = time.Now()
	return g.next
}

func (g *localGrants) remove(id uint64) {
	g.mu.Lock()
	delete(g.at, id)
	g.mu.Unlock()
}

// take returns how many grants of the last owedWindow are owed, and forgets them.
func (g *localGrants) take() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	n := 0
	for _, t := range g.at {
		if time.Since(t) < owedWindow {
			n++
		}
	}
	clear(g.at)
	return n
}

// drainLimiterTo spends the tokens of a local bucket beyond keep.
func drainLimiterTo(b *budget, keep int) {
	lim := b.limiter()
	if lim.Limit() == rate.Inf {
		return
	}
	now := time.Now()
	if n := int(lim.TokensAt(now)) - keep; n > 0 {
		lim.AllowN(now, n)
	}
}

// localCanBackground is budget.tryBackground's test, without taking anything.
func localCanBackground(b *budget) bool {
	if lim := b.limiter(); lim.Limit() != rate.Inf && lim.Tokens() < float64(1+reserveOf(lim.Burst())) {
		return false
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.limit == 0 || b.inUse+1+reserveOf(b.limit) <= b.limit
}

// acquireBudget takes a fleet token and slot for a miss, waiting at most
// until ctx ends; when Redis fails (or useFleet is false) it takes the local
// share instead, and redisFailed says so. One failed Redis call is all a
// request pays: from then on this fetch uses the local share.
func (zc *zoneCluster) acquireBudget(ctx context.Context, b *clusterBudget, useFleet bool) (release func(), retryAfter time.Duration, redisFailed bool, err error) {
	perSecond, _, concurrency := b.numbers()
	if perSecond <= 0 && concurrency <= 0 {
		return zc.granted(b, ""), 0, false, nil
	}
	if useFleet {
		release, retryAfter, err = zc.fleetAcquire(ctx, b, false)
		if err == nil || errors.Is(err, errOriginBudget) {
			b.fleet.Store(true)
			return release, retryAfter, false, err
		}
		if ctx.Err() != nil {
			return nil, time.Second, false, errOriginBudget // nobody waits any more
		}
	}
	release, retryAfter, err = b.fallbackAcquire(ctx)
	return release, retryAfter, useFleet, err
}

// afterLock completes the fleet grant of a fetch whose token came with the
// lock (acquireScript): it sleeps until the token's time, then leases a slot.
// A Redis failure on the slot falls back to the local share (the fleet token
// is spent too: conservative).
func (zc *zoneCluster) afterLock(ctx context.Context, b *clusterBudget, g gcraResult, background bool) (release func(), retryAfter time.Duration, redisFailed bool, err error) {
	perSecond, burst, concurrency := b.numbers()
	b.fleet.Store(true)
	if perSecond > 0 {
		chargeToken(b.local)
	}
	if !waitForToken(ctx, g.wait) {
		return nil, g.wait, false, errOriginBudget
	}
	slot, err := zc.slotFor(ctx, concurrency, background)
	switch {
	case err == nil:
	case errors.Is(err, errOriginBudget) || ctx.Err() != nil:
		return nil, zc.snap.retryAfter(perSecond, burst), false, errOriginBudget
	case background:
		release, ok := b.fallbackBackground()
		if !ok {
			return nil, 0, true, errOriginBudget
		}
		return release, 0, true, nil
	default:
		release, retryAfter, err = b.fallbackAcquire(ctx)
		return release, retryAfter, true, err
	}
	return zc.granted(b, slot), 0, false, nil
}

// waitForToken sleeps until a reserved fleet token's time; false when ctx
// ended first (the token is lost: the rate stays honest).
func waitForToken(ctx context.Context, wait time.Duration) bool {
	if wait <= 0 {
		return true
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// slotFor leases a fleet slot for a fetch, "" when there is no concurrency
// limit; a refresh leaves a reserve of slots for misses.
func (zc *zoneCluster) slotFor(ctx context.Context, concurrency int, background bool) (string, error) {
	if concurrency <= 0 {
		return "", nil
	}
	reserve := 0
	if background {
		reserve = reserveOf(concurrency)
	}
	return zc.takeSlot(ctx, concurrency, reserve, !background)
}

// backgroundBudget takes the budget of a refresh that could not take its
// token with the lock (Redis unreachable, or a body kept out of L2): a token
// and a slot free now, with a reserve kept for misses.
func (zc *zoneCluster) backgroundBudget(ctx context.Context, b *clusterBudget, useFleet bool) (release func(), ok bool) {
	perSecond, _, concurrency := b.numbers()
	if perSecond <= 0 && concurrency <= 0 {
		return zc.granted(b, ""), true
	}
	if useFleet {
		release, _, err := zc.fleetAcquire(ctx, b, true)
		if err == nil {
			b.fleet.Store(true)
			return release, true
		}
		if errors.Is(err, errOriginBudget) {
			b.fleet.Store(true)
			return nil, false
		}
	}
	return b.fallbackBackground()
}

// tokenTerms are how a fetch asks the fleet for a token: a miss reserves one
// up to budgetWait ahead of its deadline, a refresh takes one only now, with
// a reserve left for misses.
func (zc *zoneCluster) tokenTerms(ctx context.Context, burst int, background bool) (maxDelay time.Duration, reserve int) {
	if background {
		return 0, reserveOf(burst)
	}
	if deadline, ok := ctx.Deadline(); ok {
		maxDelay = zc.budgetWait(time.Until(deadline))
	}
	return maxDelay, 0
}

// fleetAcquire takes a GCRA token (reserving one up to the ctx deadline
// ahead, then sleeping until it) and a leased slot. background asks for both
// free now with a reserve left. A Redis failure returns that error.
func (zc *zoneCluster) fleetAcquire(ctx context.Context, b *clusterBudget, background bool) (release func(), retryAfter time.Duration, err error) {
	perSecond, burst, concurrency := b.numbers()
	if perSecond > 0 {
		maxDelay, reserve := zc.tokenTerms(ctx, burst, background)
		g, err := zc.gcra(ctx, perSecond, burst, maxDelay, reserve)
		if err != nil {
			return nil, 0, err
		}
		if !g.ok {
			return nil, max(g.wait, time.Second), errOriginBudget
		}
		chargeToken(b.local)
		if !waitForToken(ctx, g.wait) {
			return nil, g.wait, errOriginBudget
		}
	}
	slot, err := zc.slotFor(ctx, concurrency, background)
	if err != nil {
		if errors.Is(err, errOriginBudget) {
			return nil, zc.snap.retryAfter(perSecond, burst), errOriginBudget
		}
		return nil, 0, err
	}
	return zc.granted(b, slot), 0, nil
}

// budgetWait is how far ahead a miss may reserve a token, out of the time
// left before its clients stop waiting: the fetch must fit in the rest. A
// token that comes too late to answer anyone would spend the origin's budget
// on a fetch whose clients have already had a 504; refusing it now gives them
// a 503 with Retry-After instead. The fetch gets a quarter of the time left,
// or twice the zone's recent fetch time when that is more.
func (zc *zoneCluster) budgetWait(left time.Duration) time.Duration {
	return max(0, left-max(left/4, 2*time.Duration(zc.fetchTime.Load())))
}

// observeFetch feeds a fetch's duration to the moving average (weight 1/8).
func (zc *zoneCluster) observeFetch(d time.Duration) {
	old := zc.fetchTime.Load()
	if old == 0 {
		zc.fetchTime.Store(int64(d))
		return
	}
	zc.fetchTime.Store(old + (int64(d)-old)/8)
}

// granted records a fleet grant and returns its release. Its slot is counted
// in the local budget too, as its token was (chargeToken).
func (zc *zoneCluster) granted(b *clusterBudget, slot string) func() {
	zc.fleetInFlight.Add(1)
	b.local.mu.Lock()
	b.local.inUse++
	b.local.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			zc.fleetInFlight.Add(-1)
			b.local.releaseSlot()
			if slot != "" {
				zc.cl.renew.removeSlot(zc.slotsKey, slot)
				go zc.releaseSlot(slot) // off the request path
			}
		})
	}
}

// chargeToken takes a token from the local bucket (into debt, at most a
// second of refill deep) for each token the fleet grants this instance, when
// it is granted (a reserved one may be used up to max_wait later). The local
// share is what this instance falls back to when a Redis call fails, and it
// must not add to what this instance already took from the fleet: a fallback
// finds a token only when this instance used less than its share lately.
func chargeToken(b *budget) {
	if lim := b.limiter(); lim.Limit() != rate.Inf {
		if lim.Tokens() > -max(float64(lim.Limit()), float64(lim.Burst())) {
			lim.ReserveN(time.Now(), 1)
		}
	}
}

// gcraFn is the generic cell rate algorithm on Redis's clock, as a Lua
// function for the scripts that take a token: key holds the theoretical
// arrival time (TAT, µs); T is the emission interval (µs); a grant may lie up
// to maxDelay (µs) ahead, and the caller sleeps until then; reserve tokens
// are left for others (background refreshes). It returns whether the token
// was granted, the delay (µs; the wait for one when refused) and the tokens
// left after.
const gcraFn = `
local function gcra(key, T, burst, maxDelay, reserve)
	local t = redis.call('TIME')
	local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
	local tat = tonumber(redis.call('GET', key) or '0')
	if tat < now then tat = now end
	local newtat = tat + T
	local delay = newtat - burst * T - now
	if delay + reserve * T > maxDelay then
		return false, math.max(delay, 0), (burst * T - (tat - now)) / T
	end
	redis.call('SET', key, string.format('%.0f', newtat), 'PX', math.ceil((newtat - now) / 1000) + 1000)
	return true, math.max(delay, 0), (burst * T - (newtat - now)) / T
end
`

// gcraScript takes a token alone (pass-through requests): KEYS the GCRA key;
// ARGV T, burst, max delay, reserve. Replies {granted, delay (µs), tokens ×1000}.
var gcraScript = redis.NewScript(gcraFn + `
local ok, delay, tokens = gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]))
local granted = 0
if ok then granted = 1 end
return {granted, math.floor(delay), math.floor(tokens * 1000)}
`)

// gcraBarrierScript empties a fleet bucket until a delay from now (µs): no
// grant before it, then the rate from an empty bucket. ARGV T, burst, delay.
var gcraBarrierScript = redis.NewScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local T, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now + tonumber(ARGV[3]) + (burst - 1) * T)
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
return 1
`)

// gcraChargeScript charges a fleet bucket, on rejoin, with the fetches an
// instance granted on its local share lately (owedWindow), including those
// still waiting for their local token: each as a token taken now, so that in
// any second the fleet's grants and the local shares' add up to at most the
// budget and its burst. ARGV T, burst, fetches.
var gcraChargeScript = redis.NewScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local T, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now)
tat = tat + tonumber(ARGV[3]) * T
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
return 1
`)

type gcraResult struct {
	ok     bool
	wait   time.Duration // the delay granted, or the wait for a token when refused
	tokens float64       // left after
}

func (zc *zoneCluster) gcra(ctx context.Context, perSecond float64, burst int, maxDelay time.Duration, reserve int) (gcraResult, error) {
	interval := 1e6 / perSecond
	var vals []int64
	err := zc.cl.call(ctx, func(ctx context.Context) error {
		var err error
		vals, err = gcraScript.Run(ctx, zc.cl.rdb, []string{zc.gcraKey},
			strconv.FormatFloat(interval, 'f', 3, 64), burst, maxDelay.Microseconds(), reserve).Int64Slice()
		return err
	})
	if err != nil {
		return gcraResult{}, err
	}
	if len(vals) != 3 {
		return gcraResult{}, errors.New("cluster: unexpected GCRA reply")
	}
	g := gcraResult{ok: vals[0] == 1, wait: time.Duration(vals[1]) * time.Microsecond, tokens: float64(vals[2]) / 1000}
	zc.snap.setTokens(g.tokens, time.Now())
	return g, nil
}

// rejoinBudget closes the zone's fleet bucket, empty, until every instance's
// local share has stopped granting: the instances rejoin within a probe
// interval of each other, keep their shares for rejoinGrace, and a local
// token is reserved at most localWait ahead. The fleet's burst and rate then
// start after the shares' last grants, not on top of them.
func (zc *zoneCluster) rejoinBudget(ctx context.Context) error {
	b := zc.budget.Load()
	if b == nil {
		return nil
	}
	perSecond, burst, _ := b.numbers()
	if perSecond <= 0 {
		return nil
	}
	b.owed.take() // covered by the barrier
	return gcraBarrierScript.Run(ctx, zc.cl.rdb, []string{zc.gcraKey},
		strconv.FormatFloat(1e6/perSecond, 'f', 3, 64), burst, (rejoinGrace + localWait).Microseconds()).Err()
}

// chargeOwed charges the zone's fleet bucket with what this instance took
// from its local share after Redis calls failed while the breaker stayed
// closed (a partial failure), so that the fleet accounts for it.
func (zc *zoneCluster) chargeOwed(ctx context.Context) error {
	b := zc.budget.Load()
	if b == nil {
		return nil
	}
	perSecond, burst, _ := b.numbers()
	if perSecond <= 0 {
		return nil
	}
	owed := b.owed.take()
	if owed == 0 {
		return nil
	}
	err := gcraChargeScript.Run(ctx, zc.cl.rdb, []string{zc.gcraKey},
		strconv.FormatFloat(1e6/perSecond, 'f', 3, 64), burst, owed).Err()
	if err != nil {
		for range owed { // not charged: still owed
			b.owed.add()
		}
	}
	return err
}

// slotScript leases one of a zone's origin slots: KEYS[1] is a sorted set
// of holders scored by lease end (Redis clock, ms). ARGV: member, limit,
// lease (ms), slots to leave for others. Returns {granted, slots in use}.
var slotScript = redis.NewScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local n = redis.call('ZCARD', KEYS[1])
if n + 1 + tonumber(ARGV[4]) > tonumber(ARGV[2]) then return {0, n} end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) + 1000)
return {1, n + 1}
`)

var slotReleaseScript = redis.NewScript(`
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[2], KEYS[1])
return 1
`)

// takeSlot leases a fleet slot; with wait it waits (woken when another
// instance frees one, polling as a fallback) until ctx ends.
func (zc *zoneCluster) takeSlot(ctx context.Context, limit, reserve int, wait bool) (string, error) {
	member := randomToken(8)
	lease := zc.cl.cfg.lease.Milliseconds()
	poll := 10 * time.Millisecond
	for {
		var woken <-chan struct{}
		done := func() {}
		if wait {
			woken, done = zc.cl.notify.subscribe(zc.slotsKey)
		}
		var vals []int64
		err := zc.cl.call(ctx, func(ctx context.Context) error {
			var err error
			vals, err = slotScript.Run(ctx, zc.cl.rdb, []string{zc.slotsKey}, member, limit, lease, reserve).Int64Slice()
			return err
		})
		if err == nil && len(vals) != 2 {
			err = errors.New("cluster: unexpected slot reply")
		}
		if err != nil {
			done()
			return "", err
		}
		zc.snap.setSlots(int(vals[1]))
		if vals[0] == 1 {
			done()
			zc.cl.renew.addSlot(zc.slotsKey, member)
			return member, nil
		}
		if !wait {
			return "", errOriginBudget
		}
		t := time.NewTimer(poll)
		select {
		case <-woken:
		case <-t.C:
			poll = min(2*poll, 100*time.Millisecond)
		case <-ctx.Done():
			t.Stop()
			done()
			return "", errOriginBudget
		}
		t.Stop()
		done()
	}
}

func (zc *zoneCluster) releaseSlot(member string) {
	ctx, cancel := context.WithTimeout(zc.cl.ctx, zc.cl.cfg.timeout)
	defer cancel()
	if !zc.cl.healthy() {
		return // the lease runs out on its own
	}
	err := slotReleaseScript.Run(ctx, zc.cl.rdb, []string{zc.slotsKey}, member, zc.cl.key("notify")).Err()
	if err != nil && zc.cl.ctx.Err() == nil {
		zc.cl.observe(err)
	}
	zc.snap.releasedSlot()
}

// budgetSnapshot is the fleet budget as last seen, for the decisions the
// request path makes without calling Redis (available, tryBackground,
// Retry-After, stats).
type budgetSnapshot struct {
	mu        sync.Mutex // guards the fields below
	haveToken bool
	tokensAt  time.Time
	tokensN   float64
	slots     int
}

func (s *budgetSnapshot) setTokens(n float64, at time.Time) {
	s.mu.Lock()
	s.haveToken, s.tokensN, s.tokensAt = true, n, at
	s.mu.Unlock()
}

func (s *budgetSnapshot) setSlots(n int) {
	s.mu.Lock()
	s.slots = n
	s.mu.Unlock()
}

func (s *budgetSnapshot) releasedSlot() {
	s.mu.Lock()
	s.slots = max(0, s.slots-1)
	s.mu.Unlock()
}

// tokens estimates the fleet's tokens now: the last count plus the refill since.
func (s *budgetSnapshot) tokens(perSecond float64, burst int, now time.Time) float64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.haveToken {
		return float64(burst)
	}
	return min(float64(burst), s.tokensN+now.Sub(s.tokensAt).Seconds()*perSecond)
}

// recentTokens is tokens, when the count was read from Redis within maxAge.
func (s *budgetSnapshot) recentTokens(perSecond float64, burst int, now time.Time, maxAge time.Duration) (float64, bool) {
	s.mu.Lock()
	fresh := s.haveToken && now.Sub(s.tokensAt) <= maxAge
	s.mu.Unlock()
	if !fresh {
		return 0, false
	}
	return s.tokens(perSecond, burst, now), true
}

func (s *budgetSnapshot) slotsInUse() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.slots
}

func (s *budgetSnapshot) available(perSecond float64, burst, concurrency int) bool {
	if perSecond > 0 && s.tokens(perSecond, burst, time.Now()) < 1 {
		return false
	}
	return concurrency <= 0 || s.slotsInUse() < concurrency
}

func (s *budgetSnapshot) allowsBackground(perSecond float64, burst, concurrency int) bool {
	if perSecond > 0 && s.tokens(perSecond, burst, time.Now()) < float64(1+reserveOf(burst)) {
		return false
	}
	return concurrency <= 0 || s.slotsInUse()+1+reserveOf(concurrency) <= concurrency
}

func (s *budgetSnapshot) retryAfter(perSecond float64, burst int) time.Duration {
	if perSecond <= 0 {
		return time.Second
	}
	missing := 1 - s.tokens(perSecond, burst, time.Now())
	if missing <= 0 {
		return time.Second
	}
	return max(time.Duration(math.Ceil(missing/perSecond))*time.Second, time.Second)
}

// Interface guards
var _ originBudget = (*clusterBudget)(nil)

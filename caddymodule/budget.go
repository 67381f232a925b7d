package caddymodule

import (
	"context"
	"errors"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
)

// errOriginBudget means no origin fetch could start within the client's wait.
var errOriginBudget = errors.New("origin budget exhausted")

// originBudget is what a zone's fetches ask before they go to the origin: the
// local budget below, or in cluster mode the fleet-wide one (cluster_budget.go)
// that falls back to a share of this one when Redis is unreachable.
type originBudget interface {
	configure(perSecond float64, burst, concurrency int)
	acquire(ctx context.Context) (release func(), retryAfter time.Duration, err error)
	tryBackground() (release func(), ok bool)
	available() bool
	retryAfter() time.Duration
	tokens() float64
	inFlight() int
}

var _ originBudget = (*budget)(nil)

// budget bounds the zone's origin fetches: a token bucket for their rate and a
// counter for those in flight. Both can change on reload while in use.
type budget struct {
	lim atomic.Pointer[rate.Limiter] // goroutine-safe on its own; replaced only when it starts limiting

	// clock serializes the limiter calls that take the time, so the times
	// they pass never go backwards: rate.Limiter adopts each call's time as
	// its last update, and a call with an older time (taken before waiting
	// for the limiter's lock) would make the next one refill the same
	// interval twice, letting more fetches through than the rate allows.
	clock sync.Mutex

	mu      sync.Mutex // guards the fields below
	limit   int        // most fetches in flight; 0 is unlimited
	inUse   int
	waiters []chan struct{} // woken in order as slots free up
}

func newBudget() *budget {
	b := &budget{}
	b.lim.Store(rate.NewLimiter(rate.Inf, 0))
	return b
}

// configure applies new numbers; a zero rate means unlimited.
func (b *budget) configure(perSecond float64, burst, concurrency int) {
	b.clock.Lock()
	lim := b.limiter()
	switch {
	case perSecond <= 0:
		lim.SetLimit(rate.Inf)
	case lim.Limit() == rate.Inf:
		// A budget that starts limiting starts with a full bucket.
		b.lim.Store(rate.NewLimiter(rate.Limit(perSecond), burst))
	default:
		// A changed budget keeps its tokens: a reload is not a free burst.
		lim.SetLimit(rate.Limit(perSecond))
		lim.SetBurst(burst)
	}
	b.clock.Unlock()
	b.mu.Lock()
	b.limit = concurrency
	b.wakeLocked()
	b.mu.Unlock()
}

func (b *budget) limiter() *rate.Limiter { return b.lim.Load() }

// acquire takes a token and a slot, waiting at most until ctx ends. On failure
// it returns how long until a token is expected, for Retry-After.
func (b *budget) acquire(ctx context.Context) (release func(), retryAfter time.Duration, err error) {
	b.clock.Lock()
	now := time.Now()
	lim := b.limiter()
	if deadline, ok := ctx.Deadline(); ok && now.Add(tokenWait(lim, now)).After(deadline) {
		// Refused before reserving: a reservation given back while later ones
		// are queued returns only part of its token (rate.Reservation.CancelAt),
		// and many clients refused at once would drain the bucket for nothing.
		b.clock.Unlock()
		return nil, b.retryAfter(), errOriginBudget
	}
	res := lim.ReserveN(now, 1)
	b.clock.Unlock()
	if !res.OK() {
		return nil, time.Second, errOriginBudget
	}
	if delay := res.DelayFrom(now); delay > 0 {
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			b.cancel(res)
			return nil, b.retryAfter(), errOriginBudget
		}
	}
	if err := b.takeSlot(ctx); err != nil {
		// The token is spent: the origin was not asked, but the rate stays honest.
		return nil, b.retryAfter(), errOriginBudget
	}
	return b.releaseSlot, 0, nil
}

// tokenWait is how long from now until the limiter has a token for one more
// reservation (0 when it has one now).
func tokenWait(lim *rate.Limiter, now time.Time) time.Duration {
	perSecond := float64(lim.Limit())
	if lim.Limit() == rate.Inf {
		return 0
	}
	missing := 1 - lim.TokensAt(now)
	if missing <= 0 {
		return 0
	}
	if perSecond <= 0 {
		return maxRetryAfter
	}
	return time.Duration(min(missing/perSecond, maxRetryAfter.Seconds()) * float64(time.Second))
}

// maxRetryAfter bounds the waits computed from a very slow rate.
const maxRetryAfter = 24 * time.Hour

// cancel gives a reservation's token back, as far as later ones allow (a
// client that left while queued).
func (b *budget) cancel(res *rate.Reservation) {
	b.clock.Lock()
	res.CancelAt(time.Now())
	b.clock.Unlock()
}

// tryBackground starts a background fetch only when a token and a slot are free
// now and a reserve of both remains for clients who are waiting on misses.
func (b *budget) tryBackground() (release func(), ok bool) {
	if lim := b.limiter(); lim.Limit() != rate.Inf {
		reserve := reserveOf(lim.Burst())
		b.clock.Lock()
		now := time.Now()
		free := lim.TokensAt(now) >= float64(1+reserve) && lim.AllowN(now, 1)
		b.clock.Unlock()
		if !free {
			return nil, false
		}
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.limit > 0 && b.inUse+1+reserveOf(b.limit) > b.limit {
		return nil, false
	}
	b.inUse++
	return b.releaseSlot, true
}

// available says whether a fetch could start right now without waiting.
func (b *budget) available() bool {
	if lim := b.limiter(); lim.Limit() != rate.Inf && lim.Tokens() < 1 {
		return false
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.limit == 0 || b.inUse < b.limit
}

// reserveOf keeps a tenth of a budget (at least one, when there is more than one) for misses.
func reserveOf(n int) int {
	if n <= 1 {
		return 0
	}
	return max(1, n/10)
}

// tokens reports the tokens left now (+Inf when unlimited).
func (b *budget) tokens() float64 {
	lim := b.limiter()
	if lim.Limit() == rate.Inf {
		return math.Inf(1)
	}
	return lim.Tokens()
}

// retryAfter estimates when the next token is free, in whole seconds, at least one.
func (b *budget) retryAfter() time.Duration {
	lim := b.limiter()
	if lim.Limit() == rate.Inf || lim.Limit() <= 0 {
		return time.Second
	}
	secs := math.Ceil(tokenWait(lim, time.Now()).Seconds())
	return max(time.Duration(secs)*time.Second, time.Second)
}

func (b *budget) takeSlot(ctx context.Context) error {
	b.mu.Lock()
	if b.limit == 0 || b.inUse < b.limit {
		b.inUse++
		b.mu.Unlock()
		return nil
	}
	ch := make(chan struct{})
	b.waiters = append(b.waiters, ch)
	b.mu.Unlock()
	select {
	case <-ch:
		return nil // the slot was handed over by releaseSlot
	case <-ctx.Done():
		b.mu.Lock()
		defer b.mu.Unlock()
		for i, w := range b.waiters {
			if w == ch {
				b.waiters = append(b.waiters[:i], b.waiters[i+1:]...)
				return ctx.Err()
			}
		}
		// Handed a slot while giving up: pass it on.
		b.inUse--
		b.wakeLocked()
		return ctx.Err()
	}
}

func (b *budget) releaseSlot() {
	b.mu.Lock()
	b.inUse--
	b.wakeLocked()
	b.mu.Unlock()
}

// wakeLocked hands free slots to waiters in arrival order.
func (b *budget) wakeLocked() {
	for len(b.waiters) > 0 && (b.limit == 0 || b.inUse < b.limit) {
		ch := b.waiters[0]
		b.waiters = b.waiters[1:]
		b.inUse++
		close(ch)
	}
}

// inFlight reports the fetches holding a slot.
func (b *budget) inFlight() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.inUse
}

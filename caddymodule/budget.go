package caddymodule

import (
	"context"
	"errors"
	"math"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// errOriginBudget means no origin fetch could start within the client's wait.
var errOriginBudget = errors.New("origin budget exhausted")

// budget bounds the zone's origin fetches: a token bucket for their rate and a
// counter for those in flight. Both can change on reload while in use.
type budget struct {
	limiter *rate.Limiter // goroutine-safe on its own

	mu      sync.Mutex // guards the fields below
	limit   int        // most fetches in flight; 0 is unlimited
	inUse   int
	waiters []chan struct{} // woken in order as slots free up
}

func newBudget() *budget {
	return &budget{limiter: rate.NewLimiter(rate.Inf, 0)}
}

// configure applies new numbers; a zero rate means unlimited.
func (b *budget) configure(perSecond float64, burst, concurrency int) {
	if perSecond <= 0 {
		b.limiter.SetLimit(rate.Inf)
	} else {
		b.limiter.SetLimit(rate.Limit(perSecond))
		b.limiter.SetBurst(burst)
	}
	b.mu.Lock()
	b.limit = concurrency
	b.wakeLocked()
	b.mu.Unlock()
}

// acquire takes a token and a slot, waiting at most until ctx ends. On failure
// it returns how long until a token is expected, for Retry-After.
func (b *budget) acquire(ctx context.Context) (release func(), retryAfter time.Duration, err error) {
	now := time.Now()
	res := b.limiter.ReserveN(now, 1)
	if !res.OK() {
		return nil, time.Second, errOriginBudget
	}
	if delay := res.DelayFrom(now); delay > 0 {
		if deadline, ok := ctx.Deadline(); ok && now.Add(delay).After(deadline) {
			res.CancelAt(now)
			return nil, b.retryAfter(), errOriginBudget
		}
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			res.Cancel()
			return nil, b.retryAfter(), errOriginBudget
		}
	}
	if err := b.takeSlot(ctx); err != nil {
		// The token is spent: the origin was not asked, but the rate stays honest.
		return nil, b.retryAfter(), errOriginBudget
	}
	return b.releaseSlot, 0, nil
}

// tryBackground starts a background fetch only when a token and a slot are free
// now and a reserve of both remains for clients who are waiting on misses.
func (b *budget) tryBackground() (release func(), ok bool) {
	now := time.Now()
	if b.limiter.Limit() != rate.Inf {
		reserve := reserveOf(b.limiter.Burst())
		if b.limiter.TokensAt(now) < float64(1+reserve) || !b.limiter.AllowN(now, 1) {
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
	if b.limiter.Limit() != rate.Inf && b.limiter.Tokens() < 1 {
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
	if b.limiter.Limit() == rate.Inf {
		return math.Inf(1)
	}
	return b.limiter.Tokens()
}

// retryAfter estimates when the next token is free, at least one second.
func (b *budget) retryAfter() time.Duration {
	lim := b.limiter.Limit()
	if lim == rate.Inf || lim <= 0 {
		return time.Second
	}
	missing := 1 - b.limiter.Tokens()
	if missing <= 0 {
		return time.Second
	}
	return max(time.Duration(math.Ceil(missing/float64(lim)))*time.Second, time.Second)
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

package caddymodule

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// slowRate is a rate so slow that no token comes back while a test runs:
// the bucket holds exactly what the test puts in it.
const slowRate = 0.001

// budgetTryNow takes a token and a slot only if they are free without waiting.
func budgetTryNow(b *budget) (func(), time.Duration, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Millisecond)
	defer cancel()
	return b.acquire(ctx)
}

// waitFor polls cond until it holds, failing the test after a few seconds.
func budgetPoll(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func (b *budget) queuedForTest() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.waiters)
}

func TestBudgetAcquireRateAndBurst(t *testing.T) {
	for _, tc := range []struct {
		name        string
		perSecond   float64
		burst       int
		concurrency int
		immediate   int // acquisitions that succeed at once, none released
	}{
		{"unlimited", 0, 0, 0, 50},
		{"burst is the bucket, full from the start", slowRate, 5, 0, 5},
		{"burst of one", slowRate, 1, 0, 1},
		{"concurrency bounds without a rate", 0, 0, 3, 3},
		{"the smaller of the two", slowRate, 5, 2, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newBudget()
			b.configure(tc.perSecond, tc.burst, tc.concurrency)
			for i := range tc.immediate {
				if _, _, err := budgetTryNow(b); err != nil {
					t.Fatalf("acquisition %d: %v", i+1, err)
				}
			}
			if tc.perSecond == 0 && tc.concurrency == 0 {
				return
			}
			_, retryAfter, err := budgetTryNow(b)
			if !errors.Is(err, errOriginBudget) {
				t.Fatalf("acquisition %d: %v, want errOriginBudget", tc.immediate+1, err)
			}
			if retryAfter < time.Second {
				t.Fatalf("Retry-After %v, want at least a second", retryAfter)
			}
			if got := b.inFlight(); got != tc.immediate {
				t.Fatalf("inFlight %d, want %d: a failed acquisition must not hold a slot", got, tc.immediate)
			}
		})
	}
}

func TestBudgetAcquireWaitsForTokenWithinDeadline(t *testing.T) {
	b := newBudget()
	b.configure(50, 1, 0) // a token every 20ms
	if _, _, err := budgetTryNow(b); err != nil {
		t.Fatal(err)
	}
	// The next token is due in 20ms: a client that may wait 5s gets it...
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, _, err := b.acquire(ctx); err != nil {
		t.Fatalf("waiting within the deadline: %v", err)
	}
	// ...and one whose deadline comes before the token is turned away at
	// once, without keeping the token from the next client.
	if _, _, err := budgetTryNow(b); !errors.Is(err, errOriginBudget) {
		t.Fatalf("deadline before the token: %v, want errOriginBudget", err)
	}
	if _, _, err := b.acquire(ctx); err != nil {
		t.Fatalf("after a rejected reservation: %v", err)
	}
}

func TestBudgetRetryAfter(t *testing.T) {
	for _, tc := range []struct {
		perSecond float64
		want      time.Duration
	}{
		{0, time.Second},        // unlimited
		{10, time.Second},       // a token within the second
		{0.5, 2 * time.Second},  // one every two seconds
		{1.0 / 60, time.Minute}, // 1/m
	} {
		b := newBudget()
		b.configure(tc.perSecond, 1, 0)
		if tc.perSecond > 0 {
			if _, _, err := budgetTryNow(b); err != nil {
				t.Fatal(err)
			}
		}
		if got := b.retryAfter(); got != tc.want {
			t.Errorf("rate %v/s, empty bucket: retryAfter %v, want %v", tc.perSecond, got, tc.want)
		}
	}
}

func TestBudgetConcurrencyHandoff(t *testing.T) {
	b := newBudget()
	b.configure(0, 0, 1)
	release, _, err := budgetTryNow(b)
	if err != nil {
		t.Fatal(err)
	}

	// Two clients queue for the slot, in order.
	got := make(chan int, 2)
	for i := range 2 {
		go func() {
			rel, _, err := b.acquire(context.Background())
			if err != nil {
				t.Error(err)
				return
			}
			got <- i
			rel()
		}()
		budgetPoll(t, "the client to queue", func() bool { return b.queuedForTest() == i+1 })
	}
	// A third gives up while queued: it leaves the queue and holds nothing.
	ctx, cancel := context.WithCancel(context.Background())
	gaveUp := make(chan error, 1)
	go func() {
		_, _, err := b.acquire(ctx)
		gaveUp <- err
	}()
	budgetPoll(t, "the third client to queue", func() bool { return b.queuedForTest() == 3 })
	cancel()
	if err := <-gaveUp; !errors.Is(err, errOriginBudget) {
		t.Fatalf("cancelled wait: %v, want errOriginBudget", err)
	}
	if q := b.queuedForTest(); q != 2 {
		t.Fatalf("%d queued after one gave up, want 2", q)
	}

	// Releasing hands the slot straight to the first in line, then the next.
	release()
	if first, second := <-got, <-got; first != 0 || second != 1 {
		t.Fatalf("slots handed over in order %d, %d; want 0, 1", first, second)
	}
	budgetPoll(t, "every slot to be released", func() bool { return b.inFlight() == 0 })
}

func TestBudgetConfigureOnReload(t *testing.T) {
	t.Run("more concurrency wakes the queue", func(t *testing.T) {
		b := newBudget()
		b.configure(0, 0, 1)
		if _, _, err := budgetTryNow(b); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() {
			_, _, err := b.acquire(context.Background())
			done <- err
		}()
		budgetPoll(t, "the client to queue", func() bool { return b.queuedForTest() == 1 })
		b.configure(0, 0, 2)
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		if n := b.inFlight(); n != 2 {
			t.Fatalf("inFlight %d, want 2", n)
		}
	})
	t.Run("unchanged numbers keep the spent tokens", func(t *testing.T) {
		b := newBudget()
		b.configure(slowRate, 3, 0)
		for range 3 {
			if _, _, err := budgetTryNow(b); err != nil {
				t.Fatal(err)
			}
		}
		b.configure(slowRate, 3, 0) // a reload is not a free burst
		if _, _, err := budgetTryNow(b); !errors.Is(err, errOriginBudget) {
			t.Fatalf("after reload: %v, want errOriginBudget", err)
		}
	})
	t.Run("a smaller burst caps the tokens", func(t *testing.T) {
		b := newBudget()
		b.configure(slowRate, 10, 0)
		b.configure(slowRate, 2, 0)
		for range 2 {
			if _, _, err := budgetTryNow(b); err != nil {
				t.Fatal(err)
			}
		}
		if _, _, err := budgetTryNow(b); !errors.Is(err, errOriginBudget) {
			t.Fatalf("third token from a burst of 2: %v", err)
		}
	})
	t.Run("unlimited, then limited again starts full", func(t *testing.T) {
		b := newBudget()
		b.configure(slowRate, 2, 0)
		for range 2 {
			if _, _, err := budgetTryNow(b); err != nil {
				t.Fatal(err)
			}
		}
		b.configure(0, 0, 0)
		for range 20 {
			if _, _, err := budgetTryNow(b); err != nil {
				t.Fatalf("unlimited: %v", err)
			}
		}
		b.configure(slowRate, 4, 0)
		for i := range 4 {
			if _, _, err := budgetTryNow(b); err != nil {
				t.Fatalf("token %d of a fresh bucket of 4: %v", i+1, err)
			}
		}
		if _, _, err := budgetTryNow(b); !errors.Is(err, errOriginBudget) {
			t.Fatalf("fifth token: %v", err)
		}
	})
}

func TestBudgetTryBackgroundKeepsReserve(t *testing.T) {
	t.Run("tokens", func(t *testing.T) {
		b := newBudget()
		b.configure(slowRate, 10, 0) // reserve: 1 token
		var started int
		for {
			release, ok := b.tryBackground()
			if !ok {
				break
			}
			release()
			if started++; started > 10 {
				t.Fatal("background fetches never stop")
			}
		}
		if started != 9 {
			t.Fatalf("%d background fetches from 10 tokens, want 9 (one kept for misses)", started)
		}
		if b.available() != true {
			t.Fatal("the reserve token is not available to a miss")
		}
		if _, _, err := budgetTryNow(b); err != nil {
			t.Fatalf("a miss cannot take the reserve: %v", err)
		}
		if b.available() {
			t.Fatal("available with no token left")
		}
	})
	t.Run("slots", func(t *testing.T) {
		b := newBudget()
		b.configure(0, 0, 10) // reserve: 1 slot
		var held []func()
		for {
			release, ok := b.tryBackground()
			if !ok {
				break
			}
			held = append(held, release)
			if len(held) > 10 {
				t.Fatal("background fetches never stop")
			}
		}
		if len(held) != 9 {
			t.Fatalf("%d background fetches in 10 slots, want 9 (one kept for misses)", len(held))
		}
		release, _, err := budgetTryNow(b)
		if err != nil {
			t.Fatalf("a miss cannot take the reserve slot: %v", err)
		}
		if b.available() {
			t.Fatal("available with every slot taken")
		}
		release()
		for _, r := range held {
			r()
		}
		if n := b.inFlight(); n != 0 {
			t.Fatalf("inFlight %d after every release", n)
		}
	})
	t.Run("a budget of one has no reserve", func(t *testing.T) {
		b := newBudget()
		b.configure(0, 0, 1)
		release, ok := b.tryBackground()
		if !ok {
			t.Fatal("the only slot is not given to a background fetch")
		}
		if _, ok := b.tryBackground(); ok {
			t.Fatal("a second background fetch in a budget of one")
		}
		release()
	})
	t.Run("unlimited", func(t *testing.T) {
		b := newBudget()
		for range 100 {
			release, ok := b.tryBackground()
			if !ok {
				t.Fatal("refused with no budget set")
			}
			release()
		}
	})
}

// TestBudgetRateHoldsUnderContention: many goroutines taking tokens at once
// never get more than burst + rate*elapsed. (The limiter takes each caller's
// time as its clock; a caller whose time went stale while it waited for the
// limiter's lock used to set the clock back, and the next caller was given
// the same interval's tokens again: two to three times the rate.)
func TestBudgetRateHoldsUnderContention(t *testing.T) {
	const perSecond, burst = 1000.0, 10
	b := newBudget()
	b.configure(perSecond, burst, 0)
	var got atomic.Int64
	start := time.Now()
	stop := start.Add(200 * time.Millisecond)
	var wg sync.WaitGroup
	for range 32 {
		wg.Go(func() {
			for time.Now().Before(stop) {
				release, _, err := budgetTryNow(b)
				if err == nil {
					got.Add(1)
					release()
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	if allowed := burst + perSecond*elapsed.Seconds() + 1; float64(got.Load()) > allowed {
		t.Fatalf("%d tokens in %v, want at most %.0f", got.Load(), elapsed, allowed)
	}
}

// TestBudgetRefusalsKeepTokens: many clients refused at once (the next token
// comes after their deadline) take nothing from the bucket, so the clients
// after them still get the rate they were promised.
func TestBudgetRefusalsKeepTokens(t *testing.T) {
	b := newBudget()
	b.configure(10, 1, 0) // a token every 100 ms
	if _, _, err := budgetTryNow(b); err != nil {
		t.Fatalf("first token: %v", err)
	}
	var wg sync.WaitGroup
	var granted atomic.Int64
	start := make(chan struct{})
	for range 400 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
			defer cancel()
			if release, _, err := b.acquire(ctx); err == nil {
				granted.Add(1)
				release()
			}
		}()
	}
	close(start)
	wg.Wait()
	// Refusals reserve nothing: what is left is what the rate refilled, less
	// the few grants a slow machine may have let through after 80 ms.
	if tokens, g := b.tokens(), granted.Load(); tokens < -float64(g)-0.01 {
		t.Fatalf("bucket at %.2f tokens after 400 refusals and %d grants: refusals took tokens", tokens, g)
	}
}

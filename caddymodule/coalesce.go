package caddymodule

import (
	"context"
	"sync"
	"time"
)

// flight is one origin fetch that every concurrent request for its key waits on.
// res is written once, before done is closed, and never changed after.
type flight struct {
	done chan struct{}
	res  *fetchResult

	mu      sync.Mutex // guards waiters and started
	waiters int
	started bool               // the origin was asked; leaving no longer cancels
	abandon context.CancelFunc // cancels the wait for budget once nobody waits
}

// flights is the zone's coalescing table: at most one fetch per key at a time.
type flights struct {
	mu sync.Mutex // guards m
	m  map[string]*flight
}

func newFlights() *flights { return &flights{m: make(map[string]*flight)} }

// join returns the key's flight, creating it when there is none; created
// reports whether the caller must start it.
func (g *flights) join(key string) (f *flight, created bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if f, ok := g.m[key]; ok {
		f.addWaiter()
		return f, false
	}
	f = &flight{done: make(chan struct{}), waiters: 1}
	g.m[key] = f
	return f, true
}

// startBackground creates a flight nobody waits on yet, unless one is running.
func (g *flights) startBackground(key string) (*flight, bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if _, ok := g.m[key]; ok {
		return nil, false
	}
	f := &flight{done: make(chan struct{}), started: true}
	g.m[key] = f
	return f, true
}

// finish publishes the result and frees the key for the next fetch.
func (g *flights) finish(key string, f *flight, res *fetchResult) {
	g.mu.Lock()
	if g.m[key] == f {
		delete(g.m, key)
	}
	g.mu.Unlock()
	f.res = res
	close(f.done)
}

// running reports whether a fetch for key is in flight.
func (g *flights) running(key string) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	_, ok := g.m[key]
	return ok
}

func (f *flight) addWaiter() {
	f.mu.Lock()
	f.waiters++
	f.mu.Unlock()
}

// leave is called by a waiter that stops waiting; when the last one leaves
// before the origin was asked, the fetch stops waiting for budget.
func (f *flight) leave() {
	f.mu.Lock()
	f.waiters--
	abandon := f.waiters <= 0 && !f.started && f.abandon != nil
	f.mu.Unlock()
	if abandon {
		f.abandon()
	}
}

// markStarted records that the origin is being asked: from now on the fetch
// completes and stores even if every waiter leaves.
func (f *flight) markStarted() {
	f.mu.Lock()
	f.started = true
	f.mu.Unlock()
}

// wait blocks until the flight ends, the client goes away or the wait limit passes.
func (f *flight) wait(ctx context.Context, limit time.Duration) (*fetchResult, error) {
	t := time.NewTimer(limit)
	defer t.Stop()
	select {
	case <-f.done:
		return f.res, nil
	case <-ctx.Done():
		f.leave()
		return nil, ctx.Err()
	case <-t.C:
		f.leave()
		return nil, errWaitTimeout
	}
}

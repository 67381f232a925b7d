package caddymodule

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func (f *flight) waitersForTest() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.waiters
}

func TestFlightsJoin(t *testing.T) {
	g := newFlights()
	if g.running("k") {
		t.Fatal("running before any join")
	}
	f1, created := g.join("k")
	if !created || f1.waitersForTest() != 1 {
		t.Fatalf("first join: created %v, %d waiters; want a new flight with one waiter", created, f1.waitersForTest())
	}
	f2, created := g.join("k")
	if created || f2 != f1 || f1.waitersForTest() != 2 {
		t.Fatalf("second join: created %v, same flight %v, %d waiters; want to join the first", created, f2 == f1, f1.waitersForTest())
	}
	other, created := g.join("other")
	if !created || other == f1 {
		t.Fatal("a different key joined the first key's flight")
	}
	if !g.running("k") || !g.running("other") {
		t.Fatal("flights not running")
	}

	res := &fetchResult{status: 200}
	g.finish("k", f1, res)
	if g.running("k") {
		t.Fatal("still running after finish")
	}
	for i := range 2 {
		got, err := f1.wait(context.Background(), time.Second)
		if err != nil || got != res {
			t.Fatalf("waiter %d: %v, %v; want the flight's result", i, got, err)
		}
	}
	if f3, created := g.join("k"); !created || f3 == f1 {
		t.Fatal("a join after finish did not start a new flight")
	}
}

func TestFlightsConcurrentJoinCreatesOne(t *testing.T) {
	g := newFlights()
	var created atomic.Int64
	flights := make([]*flight, 100)
	var wg sync.WaitGroup
	for i := range flights {
		wg.Go(func() {
			f, c := g.join("k")
			if c {
				created.Add(1)
			}
			flights[i] = f
		})
	}
	wg.Wait()
	if created.Load() != 1 {
		t.Fatalf("%d flights created for one key, want 1", created.Load())
	}
	for _, f := range flights {
		if f != flights[0] {
			t.Fatal("joiners got different flights")
		}
	}
	if n := flights[0].waitersForTest(); n != 100 {
		t.Fatalf("%d waiters, want 100", n)
	}
}

func TestFlightsFinishOnlyItsOwnFlight(t *testing.T) {
	g := newFlights()
	current, _ := g.join("k")
	old := &flight{done: make(chan struct{})} // a flight no longer in the table
	g.finish("k", old, &fetchResult{})
	if !g.running("k") {
		t.Fatal("finishing an old flight removed the current one")
	}
	g.finish("k", current, &fetchResult{})
	if g.running("k") {
		t.Fatal("still running")
	}
}

func TestFlightWaitLeaves(t *testing.T) {
	t.Run("timeout", func(t *testing.T) {
		g := newFlights()
		f, _ := g.join("k")
		g.join("k")
		_, err := f.wait(context.Background(), 10*time.Millisecond)
		if !errors.Is(err, errWaitTimeout) {
			t.Fatalf("wait: %v, want errWaitTimeout", err)
		}
		if n := f.waitersForTest(); n != 1 {
			t.Fatalf("%d waiters after one timed out, want 1", n)
		}
		if !g.running("k") {
			t.Fatal("a waiter leaving ended the flight")
		}
	})
	t.Run("client gone", func(t *testing.T) {
		g := newFlights()
		f, _ := g.join("k")
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if _, err := f.wait(ctx, time.Minute); !errors.Is(err, context.Canceled) {
			t.Fatalf("wait: %v, want context.Canceled", err)
		}
		if n := f.waitersForTest(); n != 0 {
			t.Fatalf("%d waiters, want 0", n)
		}
	})
}

func TestFlightAbandon(t *testing.T) {
	for _, tc := range []struct {
		name      string
		waiters   int
		leave     int
		started   bool
		abandoned bool
	}{
		{"the last waiter leaves before the origin is asked", 2, 2, false, true},
		{"one of two leaves", 2, 1, false, false},
		{"the origin is already asked", 2, 2, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := newFlights()
			var f *flight
			for range tc.waiters {
				f, _ = g.join("k")
			}
			var abandoned atomic.Int64
			f.mu.Lock()
			f.abandon = func() { abandoned.Add(1) }
			f.mu.Unlock()
			if tc.started {
				f.markStarted()
			}
			for range tc.leave {
				if _, err := f.wait(context.Background(), time.Nanosecond); !errors.Is(err, errWaitTimeout) {
					t.Fatalf("wait: %v", err)
				}
			}
			if got := abandoned.Load() > 0; got != tc.abandoned {
				t.Fatalf("abandoned %v, want %v", got, tc.abandoned)
			}
			if abandoned.Load() > 1 {
				t.Fatalf("abandoned %d times", abandoned.Load())
			}
		})
	}
}

func TestFlightsStartBackground(t *testing.T) {
	g := newFlights()
	f, ok := g.startBackground("k")
	if !ok || f.waitersForTest() != 0 {
		t.Fatalf("startBackground: %v with %d waiters; want a flight nobody waits on yet", ok, f.waitersForTest())
	}
	if _, ok := g.startBackground("k"); ok {
		t.Fatal("a second background fetch for a running key")
	}
	// A client that needs the key joins the refresh rather than starting another fetch.
	joined, created := g.join("k")
	if created || joined != f {
		t.Fatal("a miss did not join the running refresh")
	}
	// The refresh has already asked the origin: the client leaving abandons nothing.
	var abandoned atomic.Bool
	f.abandon = func() { abandoned.Store(true) }
	f.wait(context.Background(), time.Nanosecond)
	if abandoned.Load() {
		t.Fatal("a background refresh was abandoned when its only client left")
	}
	g.finish("k", f, &fetchResult{})

	g.join("busy")
	if _, ok := g.startBackground("busy"); ok {
		t.Fatal("a background refresh started beside a client's fetch")
	}
}

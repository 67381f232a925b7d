package caddymodule

import (
	"math"
	"runtime"
	"testing"
)

func TestGCLimit(t *testing.T) {
	const mib = 1 << 20
	for _, tc := range []struct {
		name                                string
		live, cached, gogc, nonHeap, unused int64
		want                                int64
	}{
		// 256MiB cached, 40MiB of other live heap: 40MiB of garbage allowed, not 296MiB.
		{"cache excluded from growth", 296 * mib, 256 * mib, 100, 10 * mib, 2 * mib, 296*mib + 40*mib + 10*mib + 2*mib},
		{"gogc scales the rest", 296 * mib, 256 * mib, 50, 0, 0, 296*mib + 20*mib},
		{"floor on a small rest", 130 * mib, 128 * mib, 100, 0, 0, 130*mib + minGCAllowance},
		{"stores bigger than live (being replaced)", 100 * mib, 300 * mib, 100, 0, 0, 100*mib + minGCAllowance},
		{"no stores: plain GOGC", 50 * mib, 0, 100, 0, 0, 100 * mib},
		{"negative overheads ignored", 50 * mib, 0, 100, -5, -5, 100 * mib},
	} {
		if got := gcLimit(tc.live, tc.cached, tc.gogc, tc.nonHeap, tc.unused); got != tc.want {
			t.Errorf("%s: gcLimit = %d MiB, want %d MiB", tc.name, got/mib, tc.want/mib)
		}
	}
	if got := gcLimit(math.MaxInt64/4, 0, math.MaxInt32, 0, 0); got <= 0 {
		t.Errorf("gcLimit overflowed: %d", got)
	}
}

// fakeLimit stands for the runtime's memory limit, as debug.SetMemoryLimit sees it.
type fakeLimit struct{ v int64 }

func (f *fakeLimit) set(v int64) int64 {
	old := f.v
	if v >= 0 {
		f.v = v
	}
	return old
}

// TestGCTuner: with a store registered, a cycle sets a limit below the one
// in force but above the heap in use; a limit set by someone else becomes the
// bound; with the last store gone, the previous limit is back.
func TestGCTuner(t *testing.T) {
	const ceiling = 64 << 30
	lim := &fakeLimit{v: ceiling}
	armed := 0
	tn := newGCTuner(lim.set, func(func()) { armed++ })
	s, err := newStore(8<<20, 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()

	tn.afterGC() // no store: nothing to do
	if lim.v != ceiling {
		t.Fatalf("limit changed without a store: %d", lim.v)
	}
	tn.add(s)
	tn.add(s)
	if armed != 1 {
		t.Fatalf("armed %d times, want once", armed)
	}
	runtime.GC()
	tn.afterGC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	if lim.v >= ceiling || lim.v < int64(ms.HeapAlloc) {
		t.Fatalf("limit after a cycle with a store: %d, want below %d and above the heap in use (%d)", lim.v, int64(ceiling), ms.HeapAlloc)
	}

	lim.v = 1 << 20 // someone else (a user, automemlimit) set a lower limit
	tn.afterGC()
	if lim.v != 1<<20 || tn.ceiling != 1<<20 {
		t.Fatalf("limit %d, ceiling %d: want the limit set by someone else (%d) kept as the bound", lim.v, tn.ceiling, 1<<20)
	}
	lim.v = ceiling
	tn.afterGC()
	lowered := lim.v
	tn.remove(s)
	if lim.v != ceiling || lowered == ceiling {
		t.Fatalf("limit after the last store went: %d (lowered to %d), want %d back", lim.v, lowered, int64(ceiling))
	}
}

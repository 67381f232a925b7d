package caddymodule

import (
	"math"
	"os"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"sync"
)

// The Go GC lets the heap grow by GOGC percent of what was live after the
// last cycle before it collects again. A zone's store is live heap that
// produces no garbage (a few large byte queues), yet under the default GOGC
// of 100 it doubles the garbage allowed to pile up: 256MiB of cached entries
// let 256MiB more of dead request buffers stay resident. gcTuner applies
// GOGC to the rest of the heap only, by keeping a soft memory limit
// (runtime/debug.SetMemoryLimit) at
//
//	live heap + max(GOGC% of the live heap outside the stores, minGCAllowance)
//	+ the runtime's non-heap memory
//
// recomputed after every GC cycle, and never above the limit that was in
// force before (Caddy sets one from the cgroup or the machine's memory, a user
// may set GOMEMLIMIT). It stays out of the way when GOGC=off (the user runs
// on a memory limit alone) or SHIELD_GC_TUNING=off, and puts the previous
// limit back once no zone is left.
type gcTuner struct {
	mu      sync.Mutex
	stores  map[*store]struct{}
	started bool
	ceiling int64 // the limit before the tuner's: it never sets one above it
	set     int64 // the limit it set last (0: none in force)
	samples []metrics.Sample

	setLimit func(int64) int64 // debug.SetMemoryLimit (tests give their own)
	arm      func(func())      // armAfterGC
}

// minGCAllowance is the least garbage allowed between cycles: below it a busy
// server would collect many times a second for little gain.
const minGCAllowance = 8 << 20

var tuner = newGCTuner(debug.SetMemoryLimit, armAfterGC)

func newGCTuner(setLimit func(int64) int64, arm func(func())) *gcTuner {
	return &gcTuner{stores: map[*store]struct{}{}, setLimit: setLimit, arm: arm}
}

// tuningDisabled reports whether the environment asks the tuner to stay out.
func tuningDisabled() bool {
	return os.Getenv("SHIELD_GC_TUNING") == "off" || os.Getenv("GOGC") == "off"
}

// add registers a store whose bytes the GC should not count as growth.
func (t *gcTuner) add(s *store) {
	if tuningDisabled() {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.stores[s] = struct{}{}
	if !t.started {
		t.started = true
		t.samples = []metrics.Sample{
			{Name: "/gc/heap/live:bytes"},
			{Name: "/gc/gogc:percent"},
			{Name: "/memory/classes/total:bytes"},
			{Name: "/memory/classes/heap/objects:bytes"},
			{Name: "/memory/classes/heap/unused:bytes"},
			{Name: "/memory/classes/heap/free:bytes"},
			{Name: "/memory/classes/heap/released:bytes"},
		}
		t.arm(t.afterGC)
	}
}

// remove forgets a store that was closed.
func (t *gcTuner) remove(s *store) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.stores, s)
	if len(t.stores) == 0 {
		t.restore()
	}
}

// restore puts the limit that was in force before back. t.mu is held.
func (t *gcTuner) restore() {
	if t.set == 0 {
		return
	}
	if cur := t.setLimit(-1); cur == t.set {
		t.setLimit(t.ceiling)
	}
	t.set = 0
}

// afterGC runs on the finalizer goroutine after each GC cycle.
func (t *gcTuner) afterGC() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.stores) == 0 {
		return
	}
	var cached int64
	for s := range t.stores {
		cached += int64(s.capacity())
	}
	metrics.Read(t.samples)
	var v [7]uint64
	for i, s := range t.samples {
		if s.Value.Kind() == metrics.KindUint64 {
			v[i] = s.Value.Uint64()
		}
	}
	live, gogc := int64(v[0]), int64(v[1])
	total, objects, unused, free, released := int64(v[2]), int64(v[3]), int64(v[4]), int64(v[5]), int64(v[6])
	if live == 0 || gogc <= 0 {
		return // no cycle seen yet, or GOGC=off set at run time
	}

	cur := t.setLimit(-1)
	if t.set == 0 || cur != t.set {
		t.ceiling = cur // first run, or someone else set a limit since: it is the bound now
	}
	limit := gcLimit(live, cached, gogc, total-objects-unused-free-released, unused)
	limit = min(limit, t.ceiling)
	if limit != cur {
		t.setLimit(limit)
	}
	t.set = limit
}

// gcLimit is the memory limit that lets the heap grow by gogc percent of its
// live bytes outside the stores (at least minGCAllowance) before a cycle;
// nonHeap is the runtime's memory outside the heap (stacks, metadata),
// unused the heap's fragmentation.
func gcLimit(live, cached, gogc, nonHeap, unused int64) int64 {
	rest := max(live-cached, 0)
	allowance := int64(min(float64(rest)*float64(gogc)/100, math.MaxInt64/4))
	allowance = max(allowance, minGCAllowance)
	return live + allowance + max(nonHeap, 0) + max(unused, 0)
}

// armAfterGC calls f after every GC cycle, on the finalizer goroutine: each
// cycle frees a sentinel whose finalizer calls f and arms the next one.
func armAfterGC(f func()) {
	s := &gcSentinel{}
	runtime.SetFinalizer(s, func(*gcSentinel) {
		f()
		armAfterGC(f)
	})
}

// gcSentinel holds a pointer so that it is never batched with other tiny
// allocations, which would delay its finalizer.
type gcSentinel struct {
	_ *int
	_ [8]byte
}

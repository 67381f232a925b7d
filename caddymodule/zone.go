package caddymodule

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

// zones holds every zone in the process, keyed by name and shape, so that a
// reloaded config finds its warm zone: the new config acquires it before the
// old one releases it.
var zones = caddy.NewUsagePool()

// zoneShape is what fixes a zone's store; a different shape is a different zone.
type zoneShape struct {
	name      string
	memory    int64
	maxObject int64
}

func (s zoneShape) poolKey() string {
	return s.name + "|" + strconv.FormatInt(s.memory, 10) + "|" + strconv.FormatInt(s.maxObject, 10)
}

// zone is a named cache shared by the routes that use it: one store, one
// coalescing table and one origin budget, since one database stands behind it.
type zone struct {
	shape   zoneShape
	store   *store
	flights *flights
	// budget is a *clusterBudget: the local budget, or fleet-wide in cluster mode (cluster_budget.go).
	budget  originBudget
	hints   *keyTimes // keys recently found uncacheable: fetched directly for a while
	backoff *backoffs // keys whose background refresh failed

	logger atomic.Pointer[zap.Logger] // the newest config's logger

	// ctx ends when the zone is destroyed, cancelling its background fetches.
	ctx    context.Context
	cancel context.CancelFunc

	counts  outcomeCounts // for /shield/stats
	metrics *zoneMetrics
}

// outcomeCounts counts the zone's answers by outcome.
type outcomeCounts struct {
	hits, stale, misses, coalesced, rejected atomic.Uint64
}

type countsSnapshot struct {
	hits, stale, misses, coalesced, rejected uint64
}

func (c *outcomeCounts) add(outcome string) {
	switch outcome {
	case "hit":
		c.hits.Add(1)
	case "stale":
		c.stale.Add(1)
	case "miss", "uncacheable":
		c.misses.Add(1)
	case "coalesced":
		c.coalesced.Add(1)
	case "rejected":
		c.rejected.Add(1)
	}
}

func (c *outcomeCounts) snapshot() countsSnapshot {
	return countsSnapshot{c.hits.Load(), c.stale.Load(), c.misses.Load(), c.coalesced.Load(), c.rejected.Load()}
}

func newZone(shape zoneShape, logger *zap.Logger) (*zone, error) {
	st, err := newStore(shape.memory, shape.maxObject)
	if err != nil {
		return nil, fmt.Errorf("zone %q: %w", shape.name, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	z := &zone{
		shape:   shape,
		store:   st,
		flights: newFlights(),
		budget:  newZoneBudget(), // cluster mode can attach to it later (cluster_budget.go)
		hints:   newKeyTimes(100_000),
		backoff: newBackoffs(100_000),
		metrics: newZoneMetrics(shape.name),
		ctx:     ctx,
		cancel:  cancel,
	}
	z.logger.Store(logger)
	return z, nil
}

// Destruct implements caddy.Destructor: the last config using the zone is gone.
func (z *zone) Destruct() error {
	z.cancel()
	return z.store.close()
}

func (z *zone) log() *zap.Logger { return z.logger.Load() }

// zoneNamed finds a live zone of that name under another shape: the one a
// reload with a new memory or max_object_size replaces.
func zoneNamed(name, exceptKey string) *zone {
	var found *zone
	zones.Range(func(k, v any) bool {
		if z, ok := v.(*zone); ok && z.shape.name == name && k != exceptKey {
			found = z
			return false
		}
		return true
	})
	return found
}

// inherit takes over a resized zone's budget (its tokens and slots in use
// carry on) and copies its entries while they fit, so a resize does not
// start cold: oldest records go first when the new store is smaller.
func (z *zone) inherit(old *zone) {
	z.budget = old.budget
	copied := 0
	it := old.store.bc.Iterator()
	for it.SetNext() {
		info, err := it.Value()
		if err != nil || int64(len(info.Value())) > z.shape.maxObject+metaAllowance {
			continue
		}
		if z.store.set(info.Key(), info.Value()) == nil {
			copied++
		}
	}
	z.log().Info("zone resized: entries copied", zap.String("zone", z.shape.name),
		zap.Int64("memory", z.shape.memory), zap.Int("entries", copied))
}

// keyTimes remembers a deadline per key, bounded in count: when full, expired
// keys are dropped first, then arbitrary ones (it is only a hint).
type keyTimes struct {
	mu    sync.Mutex // guards m
	m     map[string]time.Time
	limit int
}

func newKeyTimes(limit int) *keyTimes {
	return &keyTimes{m: make(map[string]time.Time), limit: limit}
}

func (k *keyTimes) set(key string, until time.Time) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if len(k.m) >= k.limit {
		now := time.Now()
		for key, t := range k.m {
			if t.Before(now) {
				delete(k.m, key)
			}
		}
		for key := range k.m {
			if len(k.m) < k.limit*9/10 {
				break
			}
			delete(k.m, key)
		}
	}
	k.m[key] = until
}

// active reports whether key has a deadline still in the future.
func (k *keyTimes) active(key string, now time.Time) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	t, ok := k.m[key]
	if ok && !t.After(now) {
		delete(k.m, key)
		return false
	}
	return ok
}

func (k *keyTimes) clear(key string) {
	k.mu.Lock()
	delete(k.m, key)
	k.mu.Unlock()
}

func (k *keyTimes) reset() {
	k.mu.Lock()
	clear(k.m)
	k.mu.Unlock()
}

// backoffs spaces out background refreshes of keys whose refresh failed:
// 1s after the first failure, doubling up to a minute.
type backoffs struct {
	times *keyTimes
	mu    sync.Mutex // guards fails
	fails map[string]int
}

func newBackoffs(limit int) *backoffs {
	return &backoffs{times: newKeyTimes(limit), fails: make(map[string]int)}
}

func (b *backoffs) allowed(key string, now time.Time) bool { return !b.times.active(key, now) }

func (b *backoffs) failed(key string, now time.Time) {
	b.mu.Lock()
	n := b.fails[key]
	if len(b.fails) >= b.times.limit {
		clear(b.fails)
	}
	b.fails[key] = n + 1
	b.mu.Unlock()
	b.times.set(key, now.Add(min(time.Second<<min(n, 6), time.Minute)))
}

func (b *backoffs) succeeded(key string) {
	b.mu.Lock()
	delete(b.fails, key)
	b.mu.Unlock()
	b.times.clear(key)
}

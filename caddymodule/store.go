package caddymodule

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/allegro/bigcache/v3"
	"github.com/dustin/go-humanize"
)

// metaAllowance is what an entry may take beyond its body: key, headers, times.
const metaAllowance = 64 << 10

// store keeps encoded entries in bigcache, bounded in bytes. Freshness lives
// inside each entry: bigcache's single life window is set beyond any entry's,
// and space is reclaimed oldest-first when the bound is reached.
type store struct {
	bc        *bigcache.BigCache
	evictions atomic.Uint64
}

// newStore makes a store of memory bytes able to hold entries of maxEntry bytes.
func newStore(memory, maxEntry int64) (*store, error) {
	if err := checkStoreSize(memory, maxEntry); err != nil {
		return nil, err
	}
	slot := 4 * (maxEntry + metaAllowance)
	// Each shard must hold several of the largest entries; more shards mean
	// less lock contention, so take the most that keep that true.
	shards := 1
	for shards < 256 && memory/int64(shards*2) >= slot {
		shards *= 2
	}
	s := &store{}
	cfg := bigcache.Config{
		Shards:             shards,
		LifeWindow:         100 * 365 * 24 * time.Hour,
		CleanWindow:        0,
		MaxEntriesInWindow: shards * 64,
		MaxEntrySize:       1024,
		HardMaxCacheSize:   int(memory >> 20),
		Verbose:            false,
		OnRemoveWithReason: func(_ string, _ []byte, reason bigcache.RemoveReason) {
			if reason == bigcache.NoSpace {
				s.evictions.Add(1)
			}
		},
	}
	bc, err := bigcache.New(context.Background(), cfg)
	if err != nil {
		return nil, fmt.Errorf("creating bigcache: %w", err)
	}
	s.bc = bc
	tuner.add(s) // its bytes are no reason for the GC to let garbage grow (gctune.go)
	return s, nil
}

// checkStoreSize says whether a zone of memory bytes can hold entries of
// maxObject bytes: bigcache needs each shard to fit several of the largest.
func checkStoreSize(memory, maxObject int64) error {
	if memory < 1<<20 {
		return fmt.Errorf("memory %s is below the minimum of 1MiB", humanize.IBytes(uint64(max(memory, 0))))
	}
	if slot := 4 * (maxObject + metaAllowance); memory < slot {
		return fmt.Errorf("memory %s must be at least four times max_object_size plus 64KiB (%s for max_object_size %s)",
			humanize.IBytes(uint64(memory)), humanize.IBytes(uint64(slot)), humanize.IBytes(uint64(maxObject)))
	}
	return nil
}

// lookup finds the entry a request selects: the primary record, or through a
// vary spec the variant for the request's headers. flightKey is the key a
// fetch for this request coalesces on and stores under.
func (s *store) lookup(primary string, reqHeader http.Header) (e *entry, flightKey string) {
	raw, err := s.bc.Get(primary)
	if err != nil {
		return nil, primary
	}
	switch entryKind(raw) {
	case kindResponse:
		e, err := decodeEntry(raw)
		if err != nil {
			_ = s.bc.Delete(primary)
			return nil, primary
		}
		return e, primary
	case kindVarySpec:
		spec, ok := decodeVarySpec(raw)
		if !ok {
			_ = s.bc.Delete(primary)
			return nil, primary
		}
		key, _ := varyKey(primary, spec, reqHeader)
		raw, err := s.bc.Get(key)
		if err != nil {
			return nil, key
		}
		e, err := decodeEntry(raw)
		if err != nil {
			_ = s.bc.Delete(key)
			return nil, key
		}
		return e, key
	}
	_ = s.bc.Delete(primary)
	return nil, primary
}

// put stores a response for the request headers that selected it. A response
// with Vary gets (or reuses) a vary spec under the primary key and is stored
// under its variant key; one without replaces whatever the primary held.
func (s *store) put(primary string, reqHeader http.Header, e *entry) error {
	names := varyNames(e.header)
	if len(names) == 0 {
		e.vary = nil
		return s.set(primary, encodeEntry(e))
	}
	var spec varySpec
	if raw, err := s.bc.Get(primary); err == nil {
		if old, ok := decodeVarySpec(raw); ok && slices.Equal(old.names, names) {
			spec = old
		}
	}
	if spec.gen == 0 {
		spec = varySpec{gen: rand.Uint64() | 1, names: names}
		if err := s.set(primary, encodeVarySpec(spec)); err != nil {
			return err
		}
	}
	key, pairs := varyKey(primary, spec, reqHeader)
	e.vary = pairs
	return s.set(key, encodeEntry(e))
}

// putAt rewrites an entry under the exact key it was found at (refresh after 304).
func (s *store) putAt(key string, e *entry) error {
	return s.set(key, encodeEntry(e))
}

func (s *store) set(key string, b []byte) error {
	if err := s.bc.Set(key, b); err != nil {
		return fmt.Errorf("storing entry: %w", err)
	}
	return nil
}

// remove drops a key; variants become unreachable with their spec.
func (s *store) remove(key string) bool {
	return !errors.Is(s.bc.Delete(key), bigcache.ErrEntryNotFound)
}

func (s *store) len() int      { return s.bc.Len() }
func (s *store) capacity() int { return s.bc.Capacity() }
func (s *store) close() error {
	tuner.remove(s)
	return s.bc.Close()
}

// primaryOf returns the URL part of a record's key (variant keys add a suffix).
func primaryOf(key string) string {
	if i := strings.IndexByte(key, 0); i >= 0 {
		return key[:i]
	}
	return key
}

// collect returns the keys of the records for which match is true; match sees
// each record's key and encoding. The store may change meanwhile: callers act
// on the keys afterwards, and a key gone by then is simply skipped.
func (s *store) collect(match func(key string, raw []byte) bool) []string {
	var keys []string
	it := s.bc.Iterator()
	for it.SetNext() {
		info, err := it.Value()
		if err != nil {
			continue
		}
		if match(info.Key(), info.Value()) {
			keys = append(keys, info.Key())
		}
	}
	return keys
}

// purge removes the keys (hard) or marks the response records among them
// stale (soft), and returns how many records were affected. Soft purges leave
// vary specs alone: the variants they point to are marked themselves.
func (s *store) purge(keys []string, soft bool) int {
	n := 0
	for _, k := range keys {
		if !soft {
			if s.remove(k) {
				n++
			}
			continue
		}
		raw, err := s.bc.Get(k)
		if err != nil || entryKind(raw) != kindResponse {
			continue
		}
		e, err := decodeEntry(raw)
		if err != nil {
			continue
		}
		e.softPurged = true
		if s.set(k, encodeEntry(e)) == nil {
			n++
		}
	}
	return n
}

// reset empties the store and returns how many records it held.
func (s *store) reset() int {
	n := s.bc.Len()
	_ = s.bc.Reset()
	return n
}

package caddymodule

// Benchmarks of the hit path (issue 5): Handler.ServeHTTP on a stored key
// (lookup, header copy, write) and its parts, and the store. Run with
//
//	go test ./caddymodule -run '^$' -bench . -benchmem
//
// The ResponseWriter discards what it gets and keeps its header map between
// iterations, so the figures are the handler's own cost: what Caddy's server
// spends per request (connection, parsing, a fresh header map) is not in them.

import (
	"context"
	"fmt"
	"math/rand"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

const benchBodySize = 1024

// benchBody is a JSON document of exactly n bytes, as the bench origin sends.
func benchBody(id string, n int) []byte {
	head := `{"id":"` + id + `","pad":"`
	return []byte(head + strings.Repeat("x", max(n-len(head)-2, 0)) + `"}`)
}

// discardWriter is a ResponseWriter that keeps nothing but counts.
type discardWriter struct {
	header http.Header
	status int
	n      int
}

func newDiscardWriter() *discardWriter { return &discardWriter{header: make(http.Header, 8)} }

func (d *discardWriter) Header() http.Header         { return d.header }
func (d *discardWriter) WriteHeader(code int)        { d.status = code }
func (d *discardWriter) Write(p []byte) (int, error) { d.n += len(p); return len(p), nil }
func (d *discardWriter) reset()                      { clear(d.header); d.status, d.n = 0, 0 }

// benchOrigin is the handler after Shield: it answers like bench/origin and
// counts the requests that reach it.
type benchOrigin struct{ calls atomic.Int64 }

func (o *benchOrigin) ServeHTTP(w http.ResponseWriter, r *http.Request) error {
	o.calls.Add(1)
	body := benchBody(strings.TrimPrefix(r.URL.Path, "/users/"), benchBodySize)
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	h.Set("Date", time.Now().UTC().Format(http.TimeFormat))
	w.WriteHeader(http.StatusOK)
	_, err := w.Write(body)
	return err
}

var benchZoneSeq atomic.Int64

// benchHandler provisions a Shield handler as Caddy would (rule /users/* with
// ttl 1h, its own zone of 256MiB), with a silent logger.
func benchHandler(b testing.TB) *Handler {
	b.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	ttl := caddy.Duration(time.Hour)
	h := &Handler{
		Zone:   fmt.Sprintf("bench%d", benchZoneSeq.Add(1)),
		Memory: 256 << 20,
		Rules:  []Rule{{Path: caddyhttp.MatchPath{"/users/*"}, RuleOptions: RuleOptions{TTL: &ttl}}},
	}
	if err := h.Provision(ctx); err != nil {
		b.Fatal(err)
	}
	h.logger = zap.NewNop()
	h.zone.logger.Store(h.logger)
	b.Cleanup(func() {
		_ = h.Cleanup()
		cancel()
	})
	return h
}

// caddyRequest is a request carrying what Caddy's server puts in every
// request's context and Shield uses: the replacer (the path matcher needs it)
// and the access log's extra fields.
func caddyRequest(method, target string) *http.Request {
	r := httptest.NewRequest(method, target, nil)
	ctx := context.WithValue(r.Context(), caddy.ReplacerCtxKey, caddy.NewReplacer())
	ctx = context.WithValue(ctx, caddyhttp.ExtraLogFieldsCtxKey, new(caddyhttp.ExtraLogFields))
	return r.WithContext(ctx)
}

// warm stores the requests' keys through a miss each, and checks that the
// next request for each is a hit.
func warm(b testing.TB, h *Handler, next *benchOrigin, reqs ...*http.Request) {
	b.Helper()
	w := newDiscardWriter()
	for _, r := range reqs {
		for i, want := range []string{"fwd=uri-miss", "hit"} {
			w.reset()
			if err := h.ServeHTTP(w, r, next); err != nil {
				b.Fatal(err)
			}
			if got := w.header.Get("Cache-Status"); !strings.Contains(got, want) {
				b.Fatalf("%s request %d: Cache-Status %q, want %q", r.URL, i, got, want)
			}
		}
	}
}

// maxHitAllocs is issue 5's bound on heap allocations per hit in ServeHTTP.
const maxHitAllocs = 10

// TestHitAllocations holds the hit path to maxHitAllocs allocations: a hit
// on a stored key, answered in full, as a HEAD, and as a 304.
func TestHitAllocations(t *testing.T) {
	if testing.Short() {
		t.Skip("allocation counts in -short mode are skipped")
	}
	h, next := benchHandler(t), &benchOrigin{}
	warm(t, h, next, caddyRequest("GET", "http://example.com/users/1"))
	for _, tc := range []struct {
		name   string
		method string
		header []string
		status int
	}{
		{"get", "GET", nil, 200},
		{"head", "HEAD", nil, 200},
		{"conditional", "GET", []string{"If-Modified-Since", time.Now().Add(time.Hour).UTC().Format(http.TimeFormat)}, 304},
	} {
		r := caddyRequest(tc.method, "http://example.com/users/1")
		for i := 0; i+1 < len(tc.header); i += 2 {
			r.Header.Set(tc.header[i], tc.header[i+1])
		}
		w := newDiscardWriter()
		allocs := testing.AllocsPerRun(200, func() {
			w.reset()
			_ = h.ServeHTTP(w, r, next)
		})
		if w.status != tc.status || !strings.HasPrefix(w.header.Get("Cache-Status"), "shield; hit") {
			t.Fatalf("%s: status %d, Cache-Status %q: not a hit", tc.name, w.status, w.header.Get("Cache-Status"))
		}
		if allocs > maxHitAllocs {
			t.Errorf("%s: %.1f allocations per hit, want at most %d", tc.name, allocs, maxHitAllocs)
		}
	}
}

// BenchmarkServeHTTPHit is the whole hit path on one hot key: policy, key,
// store lookup and decode, freshness, header copy, Cache-Status and Age,
// metrics and the replacer, write.
func BenchmarkServeHTTPHit(b *testing.B) {
	for _, tc := range []struct {
		name  string
		req   func() *http.Request
		check func(*discardWriter) bool
	}{
		{"get", func() *http.Request { return caddyRequest("GET", "http://example.com/users/1") },
			func(w *discardWriter) bool { return w.status == 200 && w.n == benchBodySize }},
		{"head", func() *http.Request { return caddyRequest("HEAD", "http://example.com/users/1") },
			func(w *discardWriter) bool { return w.status == 200 && w.n == 0 }},
		{"if-none-match-304", func() *http.Request {
			r := caddyRequest("GET", "http://example.com/users/1")
			r.Header.Set("If-None-Match", `"nope"`) // no ETag stored: full answer after the check
			return r
		}, func(w *discardWriter) bool { return w.status == 200 }},
	} {
		b.Run(tc.name, func(b *testing.B) {
			h, next := benchHandler(b), &benchOrigin{}
			r := tc.req()
			warm(b, h, next, caddyRequest("GET", "http://example.com/users/1"))
			calls := next.calls.Load()
			w := newDiscardWriter()
			b.ReportAllocs()
			b.SetBytes(benchBodySize)
			for b.Loop() {
				w.reset()
				_ = h.ServeHTTP(w, r, next)
			}
			if !tc.check(w) || next.calls.Load() != calls {
				b.Fatalf("not a hit: status %d, %d bytes, %d origin calls", w.status, w.n, next.calls.Load()-calls)
			}
		})
	}
}

// BenchmarkServeHTTPHitZipf spreads hits over 10,000 keys with a Zipf law
// (math/rand, s=1.01), so lookups miss the CPU caches as a real key set does.
func BenchmarkServeHTTPHitZipf(b *testing.B) {
	const keys = 10_000
	h, next := benchHandler(b), &benchOrigin{}
	reqs := make([]*http.Request, keys)
	for i := range reqs {
		reqs[i] = caddyRequest("GET", "http://example.com/users/"+strconv.Itoa(i))
	}
	warm(b, h, next, reqs...)
	z := rand.NewZipf(rand.New(rand.NewSource(1)), 1.01, 1, keys-1)
	order := make([]*http.Request, 1<<16)
	for i := range order {
		order[i] = reqs[z.Uint64()]
	}
	calls := next.calls.Load()
	w := newDiscardWriter()
	b.ReportAllocs()
	b.SetBytes(benchBodySize)
	i := 0
	for b.Loop() {
		w.reset()
		_ = h.ServeHTTP(w, order[i&(len(order)-1)], next)
		i++
	}
	if next.calls.Load() != calls {
		b.Fatalf("%d origin calls during the hits", next.calls.Load()-calls)
	}
}

// BenchmarkRespondLike is the floor for a handler answering the same 1 KiB
// with the same writer: what Caddy's respond does per request, in process.
func BenchmarkRespondLike(b *testing.B) {
	body := benchBody("1", benchBodySize)
	w := newDiscardWriter()
	b.ReportAllocs()
	b.SetBytes(benchBodySize)
	for b.Loop() {
		w.reset()
		h := w.Header()
		h.Set("Content-Type", "application/json")
		h.Set("Content-Length", strconv.Itoa(len(body)))
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write(body)
	}
}

// benchEntry returns a stored hit's entry (decoded from the store, as a hit
// sees it) and its handler.
func benchEntry(b *testing.B) (*Handler, *entry, string) {
	b.Helper()
	h, next := benchHandler(b), &benchOrigin{}
	r := caddyRequest("GET", "http://example.com/users/1")
	warm(b, h, next, r)
	key := requestKey(r)
	e, _ := h.zone.store.lookup(key, r.Header)
	if e == nil {
		b.Fatal("entry not stored")
	}
	return h, e, key
}

// The hit path's parts.

func BenchmarkHitPart(b *testing.B) {
	h, e, key := benchEntry(b)
	r := caddyRequest("GET", "http://example.com/users/1")
	b.Run("policyFor", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			_ = h.policyFor(r)
		}
	})
	b.Run("requestKey", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			_ = requestKey(r)
		}
	})
	b.Run("store.lookup", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if e, _ := h.zone.store.lookup(key, r.Header); e == nil {
				b.Fatal("miss")
			}
		}
	})
	b.Run("bigcache.Get", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			_, _ = h.zone.store.bc.Get(key)
		}
	})
	b.Run("hints.active", func(b *testing.B) {
		b.ReportAllocs()
		now := time.Now()
		for b.Loop() {
			_ = h.zone.hints.active(key, now)
		}
	})
	b.Run("writeEntry", func(b *testing.B) { // header copy, Age, Cache-Status, metrics, write
		w := newDiscardWriter()
		b.ReportAllocs()
		for b.Loop() {
			w.reset()
			now := time.Now()
			_ = h.writeEntry(w, r, e, false, true, now, "hit", hitStatus(e.freshFor(now)))
		}
	})
	b.Run("outcome", func(b *testing.B) { // Cache-Status, counters, replacer, log field
		w := newDiscardWriter()
		b.ReportAllocs()
		for b.Loop() {
			h.outcome(w, r, "hit", "shield; hit; ttl=3600")
		}
	})
	b.Run("hitStatus", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			_ = hitStatus(42 * time.Minute)
		}
	})
	b.Run("ageSeconds", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			_ = ageSeconds(42 * time.Second)
		}
	})
}

// The store.

func BenchmarkStore(b *testing.B) {
	_, e, _ := benchEntry(b)
	raw := encodeEntry(e)
	b.Run("encodeEntry", func(b *testing.B) {
		b.ReportAllocs()
		b.SetBytes(int64(len(raw)))
		for b.Loop() {
			_ = encodeEntry(e)
		}
	})
	b.Run("decodeEntry", func(b *testing.B) {
		b.ReportAllocs()
		b.SetBytes(int64(len(raw)))
		for b.Loop() {
			if _, err := decodeEntry(raw); err != nil {
				b.Fatal(err)
			}
		}
	})

	newStoreB := func(b *testing.B) *store {
		s, err := newStore(256<<20, defaultMaxObjectSize)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { _ = s.close() })
		return s
	}
	keys := make([]string, 10_000)
	for i := range keys {
		keys[i] = "example.com/users/" + strconv.Itoa(i)
	}
	hdr := http.Header{}

	b.Run("put/same-key", func(b *testing.B) {
		s := newStoreB(b)
		b.ReportAllocs()
		for b.Loop() {
			if err := s.put(keys[1], hdr, e); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("put/10k-keys", func(b *testing.B) {
		s := newStoreB(b)
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			if err := s.put(keys[i%len(keys)], hdr, e); err != nil {
				b.Fatal(err)
			}
			i++
		}
	})
	b.Run("put/distinct-keys-64MiB", func(b *testing.B) { // evicting once full
		s, err := newStore(64<<20, defaultMaxObjectSize)
		if err != nil {
			b.Fatal(err)
		}
		defer s.close()
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			if err := s.put("example.com/flood/"+strconv.Itoa(i), hdr, e); err != nil {
				b.Fatal(err)
			}
			i++
		}
	})
	b.Run("lookup/hot", func(b *testing.B) {
		s := newStoreB(b)
		_ = s.put(keys[1], hdr, e)
		b.ReportAllocs()
		for b.Loop() {
			if got, _ := s.lookup(keys[1], hdr); got == nil {
				b.Fatal("miss")
			}
		}
	})
	b.Run("lookup/zipf-10k", func(b *testing.B) {
		s := newStoreB(b)
		for _, k := range keys {
			_ = s.put(k, hdr, e)
		}
		z := rand.NewZipf(rand.New(rand.NewSource(1)), 1.01, 1, uint64(len(keys)-1))
		order := make([]string, 1<<16)
		for i := range order {
			order[i] = keys[z.Uint64()]
		}
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			if got, _ := s.lookup(order[i&(len(order)-1)], hdr); got == nil {
				b.Fatal("miss")
			}
			i++
		}
	})
	b.Run("lookup/vary", func(b *testing.B) {
		s := newStoreB(b)
		ve := *e
		ve.header = e.header.Clone()
		ve.header.Set("Vary", "Accept-Encoding")
		req := http.Header{"Accept-Encoding": {"gzip"}}
		if err := s.put(keys[2], req, &ve); err != nil {
			b.Fatal(err)
		}
		b.ReportAllocs()
		for b.Loop() {
			if got, _ := s.lookup(keys[2], req); got == nil {
				b.Fatal("miss")
			}
		}
	})
	b.Run("lookup/absent", func(b *testing.B) {
		s := newStoreB(b)
		b.ReportAllocs()
		for b.Loop() {
			_, _ = s.lookup("example.com/absent", hdr)
		}
	})
}

package api

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// gate replaces the query latency: each query reports on entered and then
// holds its connection until release is closed.
type gate struct {
	entered chan struct{}
	release chan struct{}
}

func newGate(s *Server) *gate {
	g := &gate{entered: make(chan struct{}, 64), release: make(chan struct{})}
	s.wait = func(ctx context.Context, _ time.Duration) error {
		g.entered <- struct{}{}
		select {
		case <-g.release:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return g
}

// instant makes queries take no time.
func instant(s *Server) *Server {
	s.wait = func(context.Context, time.Duration) error { return nil }
	return s
}

type reply struct {
	status int
	header http.Header
	body   string
}

func do(t *testing.T, h http.Handler, method, target string, hdr map[string]string) reply {
	t.Helper()
	req := httptest.NewRequest(method, target, nil)
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return reply{rec.Code, rec.Header(), rec.Body.String()}
}

func decode[T any](t *testing.T, body string) T {
	t.Helper()
	var v T
	if err := json.Unmarshal([]byte(body), &v); err != nil {
		t.Fatalf("decode %q: %v", body, err)
	}
	return v
}

func TestDefaults(t *testing.T) {
	got := New(Config{}).Config()
	want := Config{Addr: DefaultAddr, PoolSize: DefaultPoolSize, Latency: DefaultLatency, QueueTimeout: DefaultQueueTimeout}
	if got != want {
		t.Fatalf("defaults = %+v, want %+v", got, want)
	}
}

func TestPoolExhaustion(t *testing.T) {
	// A short queue timeout: the pool stays held by the gate, so the extra
	// request is rejected however long it would wait.
	s := New(Config{PoolSize: 2, QueueTimeout: time.Millisecond})
	g := newGate(s)

	var wg sync.WaitGroup
	held := make([]reply, 2)
	for i := range held {
		wg.Go(func() { held[i] = do(t, s, "GET", "/users/1", nil) })
	}
	<-g.entered
	<-g.entered

	r := do(t, s, "GET", "/users/2", nil)
	if r.status != http.StatusServiceUnavailable {
		t.Fatalf("status with the pool held = %d, want 503", r.status)
	}
	if e := decode[map[string]string](t, r.body); e["error"] != "database pool exhausted" {
		t.Fatalf("error body = %q", r.body)
	}
	if cc := r.header.Get("Cache-Control"); cc != "no-store" {
		t.Fatalf("Cache-Control on 503 = %q, want no-store", cc)
	}
	st := s.Stats()
	if st.InFlight != 2 || st.PeakInFlight != 2 || st.Rejected != 1 || st.Queries != 2 {
		t.Fatalf("stats while held = %+v", st)
	}

	close(g.release)
	wg.Wait()
	for i, r := range held {
		if r.status != http.StatusOK {
			t.Fatalf("held request %d: status %d, body %s", i, r.status, r.body)
		}
	}
	st = s.Stats()
	want := Stats{Queries: 2, Served: 2, Rejected: 1, InFlight: 0, PeakInFlight: 2}
	if st != want {
		t.Fatalf("stats after release = %+v, want %+v", st, want)
	}
}

func TestQueuedRequestGetsFreedConnection(t *testing.T) {
	// A long queue timeout: the second request must get the connection the
	// first one frees rather than fail.
	s := New(Config{PoolSize: 1, QueueTimeout: time.Minute})
	g := newGate(s)

	first := make(chan reply)
	go func() { first <- do(t, s, "GET", "/users/1", nil) }()
	<-g.entered
	second := make(chan reply)
	go func() { second <- do(t, s, "GET", "/users/2", nil) }()

	g.release <- struct{}{} // lets exactly the first query finish
	if r := <-first; r.status != http.StatusOK {
		t.Fatalf("first: status %d", r.status)
	}
	<-g.entered
	close(g.release)
	if r := <-second; r.status != http.StatusOK {
		t.Fatalf("second: status %d, body %s", r.status, r.body)
	}
	if st := s.Stats(); st.Rejected != 0 || st.Queries != 2 || st.PeakInFlight != 1 {
		t.Fatalf("stats = %+v", st)
	}
}

func TestUsers(t *testing.T) {
	s := instant(New(Config{}))

	r := do(t, s, "GET", "/users/42", nil)
	if r.status != http.StatusOK {
		t.Fatalf("status %d", r.status)
	}
	if cc := r.header.Get("Cache-Control"); cc != "" {
		t.Fatalf("users sent Cache-Control %q; the Caddyfile ttl should decide", cc)
	}
	if ct := r.header.Get("Content-Type"); ct != "application/json" {
		t.Fatalf("Content-Type = %q", ct)
	}
	u := decode[user](t, r.body)
	if u.ID != 42 || u.Name == "" || u.Version != 1 {
		t.Fatalf("user = %+v", u)
	}
	if _, err := time.Parse(time.RFC3339Nano, u.GeneratedAt); err != nil {
		t.Fatalf("generated_at %q: %v", u.GeneratedAt, err)
	}

	if r := do(t, s, "POST", "/users/42", nil); decode[user](t, r.body).Version != 2 {
		t.Fatalf("POST did not bump the version: %s", r.body)
	}
	if r := do(t, s, "GET", "/users/42", nil); decode[user](t, r.body).Version != 2 {
		t.Fatalf("GET after POST: %s", r.body)
	}
	if r := do(t, s, "GET", "/users/43", nil); decode[user](t, r.body).Version != 1 {
		t.Fatalf("another user's version moved: %s", r.body)
	}

	for _, target := range []string{"/users/abc", "/users/0", "/nope"} {
		if r := do(t, s, "GET", target, nil); r.status != http.StatusNotFound {
			t.Fatalf("GET %s: status %d, want 404", target, r.status)
		}
	}
}

func TestProductConditional(t *testing.T) {
	s := instant(New(Config{}))

	r := do(t, s, "GET", "/products/7", nil)
	if r.status != http.StatusOK {
		t.Fatalf("status %d", r.status)
	}
	if cc := r.header.Get("Cache-Control"); cc != "public, max-age=30" {
		t.Fatalf("Cache-Control = %q", cc)
	}
	etag := r.header.Get("ETag")
	if !strings.HasPrefix(etag, `"`) || !strings.HasSuffix(etag, `"`) || len(etag) < 3 {
		t.Fatalf("ETag = %q, want a quoted strong validator", etag)
	}
	if again := do(t, s, "GET", "/products/7", nil); again.header.Get("ETag") != etag || again.body != r.body {
		t.Fatalf("the same product changed: %q %q", again.header.Get("ETag"), again.body)
	}
	if other := do(t, s, "GET", "/products/8", nil); other.header.Get("ETag") == etag {
		t.Fatalf("two products share ETag %s", etag)
	}

	for _, inm := range []string{etag, "W/" + etag, `"other", ` + etag, "*"} {
		r := do(t, s, "GET", "/products/7", map[string]string{"If-None-Match": inm})
		if r.status != http.StatusNotModified {
			t.Fatalf("If-None-Match %s: status %d, want 304", inm, r.status)
		}
		if r.body != "" {
			t.Fatalf("304 with a body: %q", r.body)
		}
		if r.header.Get("ETag") != etag || r.header.Get("Cache-Control") != "public, max-age=30" {
			t.Fatalf("304 headers = %v", r.header)
		}
	}
	if r := do(t, s, "GET", "/products/7", map[string]string{"If-None-Match": `"stale"`}); r.status != http.StatusOK || r.body == "" {
		t.Fatalf("non-matching If-None-Match: status %d, body %q", r.status, r.body)
	}
}

func TestPayments(t *testing.T) {
	s := instant(New(Config{}))
	r := do(t, s, "GET", "/payments/9", nil)
	if r.status != http.StatusOK {
		t.Fatalf("status %d", r.status)
	}
	if cc := r.header.Get("Cache-Control"); cc != "" {
		t.Fatalf("payments sent Cache-Control %q; the Caddyfile bypass should decide", cc)
	}
	if p := decode[payment](t, r.body); p.ID != 9 || p.Status == "" || p.GeneratedAt == "" {
		t.Fatalf("payment = %+v", p)
	}
}

func TestStatsAndReset(t *testing.T) {
	s := instant(New(Config{}))
	srv := httptest.NewServer(s)
	defer srv.Close()

	get := func(path string) {
		t.Helper()
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	get("/users/1")
	get("/users/1")
	get("/products/1")
	get("/payments/1")
	get("/users/nope") // 404 before any query: not counted

	stats := func(method, path string) Stats {
		t.Helper()
		req, _ := http.NewRequest(method, srv.URL+path, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("%s %s: status %d", method, path, resp.StatusCode)
		}
		var st Stats
		if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
			t.Fatalf("decode stats: %v", err)
		}
		return st
	}

	want := Stats{Queries: 4, Served: 4, PeakInFlight: 1}
	if st := stats("GET", "/__stats"); st != want {
		t.Fatalf("stats = %+v, want %+v", st, want)
	}
	if st := s.Stats(); st != want {
		t.Fatalf("in-process stats = %+v, want %+v", st, want)
	}
	if st := stats("POST", "/__reset"); st != (Stats{}) {
		t.Fatalf("stats after reset = %+v, want zero", st)
	}
	if st := stats("GET", "/__stats"); st != (Stats{}) {
		t.Fatalf("stats endpoint counted itself: %+v", st)
	}
}

func TestEtagMatches(t *testing.T) {
	cases := []struct {
		header string
		want   bool
	}{
		{"", false},
		{`"a"`, true},
		{`W/"a"`, true},
		{`"b"`, false},
		{` "b" , "a" `, true},
		{`*`, true},
		{`a`, false},
	}
	for _, c := range cases {
		if got := etagMatches(c.header, `"a"`); got != c.want {
			t.Errorf("etagMatches(%q) = %v, want %v", c.header, got, c.want)
		}
	}
}

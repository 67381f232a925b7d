package integration

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The tests of issue 3: origin protection. Coalescing that survives client
// loss, stale serving under error and overload, an origin budget. They
// coordinate with channels and counters: an origin blocks on a gate until the
// test has seen what it needs, and nothing is asserted about wall-clock speed.

// protGate is a channel origin handlers block on until the test opens it.
// Tests register open as a cleanup after creating the origin, so that a failed
// test never leaves a handler blocked (httptest's Close waits for handlers).
type protGate struct {
	ch   chan struct{}
	once sync.Once
}

func newProtGate() *protGate { return &protGate{ch: make(chan struct{})} }

func (g *protGate) open() { g.once.Do(func() { close(g.ch) }) }

func (g *protGate) isOpen() bool {
	select {
	case <-g.ch:
		return true
	default:
		return false
	}
}

// wait blocks until the gate opens (true) or the request is abandoned by its
// sender, here Caddy's reverse proxy (false).
func (g *protGate) wait(r *http.Request) bool {
	select {
	case <-g.ch:
		return true
	case <-r.Context().Done():
		return false
	}
}

// protClient returns a client with room for conns concurrent connections to
// the test Caddy; keepAlive false opens a fresh connection per request.
func protClient(t *testing.T, conns int, keepAlive bool) *http.Client {
	t.Helper()
	tr := &http.Transport{
		MaxIdleConns:        conns,
		MaxIdleConnsPerHost: conns,
		IdleConnTimeout:     30 * time.Second,
		DisableKeepAlives:   !keepAlive,
		DisableCompression:  true,
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{
		Transport: tr,
		Timeout:   30 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		},
	}
}

// protResult is one response as a concurrent client saw it.
type protResult struct {
	code   int
	header http.Header
	body   string
	err    error
}

// status is the result's Cache-Status, for messages.
func (r protResult) status() string { return r.header.Get("Cache-Status") }

// protGet sends a GET to the test Caddy. It reports errors instead of
// failing the test, so that it can run on any goroutine.
func protGet(ctx context.Context, c *http.Client, path string, header ...string) protResult {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+path, nil)
	if err != nil {
		return protResult{err: err}
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Add(header[i], header[i+1])
	}
	resp, err := c.Do(req)
	if err != nil {
		return protResult{err: err}
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return protResult{code: resp.StatusCode, header: resp.Header, body: string(body), err: err}
}

// protBurst starts n concurrent GETs of path(i), with header(i) when given;
// wait returns the results in order, failing the test if they are not all in
// within limit.
func protBurst(c *http.Client, n int, path func(i int) string, header func(i int) []string) (wait func(t *testing.T, limit time.Duration) []protResult) {
	results := make([]protResult, n)
	var wg sync.WaitGroup
	for i := range n {
		var h []string
		if header != nil {
			h = header(i)
		}
		wg.Go(func() { results[i] = protGet(context.Background(), c, path(i), h...) })
	}
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	return func(t *testing.T, limit time.Duration) []protResult {
		t.Helper()
		select {
		case <-done:
			return results
		case <-time.After(limit):
			t.Fatalf("not all %d responses arrived within %v", n, limit)
			return nil
		}
	}
}

// protEventually polls cond until it holds, failing the test after limit.
func protEventually(t *testing.T, what string, limit time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", limit, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// protWaiters counts the requests waiting on a shared fetch inside Shield:
// the goroutines parked in the flight's wait. Caddy runs in this process, so
// the test can see them; this is how it knows that clients are queued behind
// a fetch before it lets the origin answer. (The goroutine profile groups
// identical stacks, which keeps this cheap with thousands of goroutines.)
func protWaiters() int {
	var buf bytes.Buffer
	if err := pprof.Lookup("goroutine").WriteTo(&buf, 1); err != nil {
		panic(err)
	}
	n := 0
	for _, block := range strings.Split(buf.String(), "\n\n") {
		if !strings.Contains(block, "caddymodule.(*flight).wait+") {
			continue
		}
		count, _, _ := strings.Cut(block, " @ ")
		k, err := strconv.Atoi(strings.TrimSpace(count[strings.LastIndexByte(count, '\n')+1:]))
		if err != nil {
			panic(fmt.Sprintf("goroutine profile: %q", count))
		}
		n += k
	}
	return n
}

// protWaitForWaiters waits until n requests are queued behind a fetch.
func protWaitForWaiters(t *testing.T, n int) {
	t.Helper()
	protEventually(t, fmt.Sprintf("%d requests to wait on the fetch", n), 60*time.Second, func() bool {
		time.Sleep(10 * time.Millisecond)
		return protWaiters() >= n
	})
}

// protStampede sends n concurrent GETs for path while the origin holds its
// answer: it opens gate once the origin was asked and all n requests (the
// one whose miss started the fetch, and the n-1 others) are waiting on that
// fetch, then checks that all n got the same 200.
func protStampede(t *testing.T, n int, path string, asked, gate *protGate, wantBody string) {
	t.Helper()
	c := protClient(t, n, true)
	wait := protBurst(c, n, func(int) string { return path }, nil)
	protEventually(t, "the origin to be asked", 20*time.Second, asked.isOpen)
	protWaitForWaiters(t, n)
	gate.open()
	results := wait(t, 60*time.Second)
	var collapsed int
	first := results[0]
	for i, r := range results {
		if r.err != nil {
			t.Fatalf("request %d: %v", i, r.err)
		}
		if r.code != http.StatusOK || r.body != wantBody {
			t.Fatalf("request %d: %d %q (Cache-Status %q), want 200 %q", i, r.code, r.body, r.status(), wantBody)
		}
		for _, h := range []string{"Etag", "Cache-Control", "X-Fetch"} {
			if r.header.Get(h) != first.header.Get(h) {
				t.Fatalf("request %d: %s %q, request 0 had %q", i, h, r.header.Get(h), first.header.Get(h))
			}
		}
		if strings.Contains(r.status(), "collapsed") {
			collapsed++
		}
	}
	if collapsed != n-1 {
		t.Fatalf("%d answers collapsed into the fetch, want %d", collapsed, n-1)
	}
}

// TestProtectionColdKeyStampede: 1000 concurrent requests for a key never
// stored make one origin fetch, and all get the same 200.
func TestProtectionColdKeyStampede(t *testing.T) {
	asked, gate := newProtGate(), newProtGate()
	var fetches atomic.Int64
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		n := fetches.Add(1)
		asked.open()
		if !gate.wait(r) {
			return
		}
		w.Header().Set("Cache-Control", "max-age=60")
		w.Header().Set("ETag", `"v1"`)
		w.Header().Set("X-Fetch", strconv.FormatInt(n, 10))
		fmt.Fprintf(w, "fetch %d", n)
	})
	t.Cleanup(gate.open)
	startCaddy(t, "\t\tzone prot-cold\n\t\tmax_wait 1m", o.hostPort())

	protStampede(t, 1000, "/stampede", asked, gate, "fetch 1")
	wantHits(t, o, 1)
}

// TestProtectionExpiredKeyStampede: the same for a stored key that has expired
// and has no stale window: one fetch replaces it, and everyone gets the new copy.
func TestProtectionExpiredKeyStampede(t *testing.T) {
	asked, gate := newProtGate(), newProtGate()
	var fetches atomic.Int64
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		n := fetches.Add(1)
		if n == 1 {
			// Already older than its lifetime when it arrives: stored, but expired.
			w.Header().Set("Cache-Control", "max-age=10")
			w.Header().Set("Age", "100")
		} else {
			asked.open()
			if !gate.wait(r) {
				return
			}
			w.Header().Set("Cache-Control", "max-age=60")
		}
		w.Header().Set("X-Fetch", strconv.FormatInt(n, 10))
		fmt.Fprintf(w, "fetch %d", n)
	})
	t.Cleanup(gate.open)
	startCaddy(t, "\t\tzone prot-expired\n\t\tmax_wait 1m", o.hostPort())

	resp, body := get(t, "/expiring")
	want200(t, resp, body, "fetch 1")
	wantStatus(t, resp, "stored")

	protStampede(t, 1000, "/expiring", asked, gate, "fetch 2")
	wantHits(t, o, 2)
}

// want200 fails the test unless the response is a 200 with the body given.
func want200(t *testing.T, resp *http.Response, body, wantBody string) {
	t.Helper()
	if resp.StatusCode != http.StatusOK || body != wantBody {
		t.Fatalf("got %d %q (Cache-Status %q), want 200 %q", resp.StatusCode, body, resp.Header.Get("Cache-Status"), wantBody)
	}
}

// TestProtectionLeaderDisconnect: the client whose request started the fetch
// disconnects 100 ms into a 500 ms fetch. The fetch goes on: the 9 clients
// waiting on it get the whole body, it is stored, and the origin was asked once.
func TestProtectionLeaderDisconnect(t *testing.T) {
	payload := strings.Repeat("0123456789abcdef", (256<<10)/16) // 256 KiB
	asked, gate := newProtGate(), newProtGate()
	var abandoned atomic.Bool
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		asked.open()
		if !gate.wait(r) {
			abandoned.Store(true) // Caddy gave up on the fetch
			return
		}
		w.Header().Set("Cache-Control", "max-age=60")
		io.WriteString(w, payload)
	})
	t.Cleanup(gate.open)
	startCaddy(t, "\t\tzone prot-disconnect", o.hostPort())
	c := protClient(t, 16, true)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	leader := make(chan protResult, 1)
	go func() { leader <- protGet(ctx, c, "/report") }()
	protEventually(t, "the origin to be asked", 10*time.Second, asked.isOpen)
	fetchStart := time.Now()

	wait := protBurst(c, 9, func(int) string { return "/report" }, nil)
	protWaitForWaiters(t, 10) // the leader and its 9 followers

	// The scenario's own timeline: the leader leaves 100 ms into the fetch,
	// and the origin answers 500 ms into it.
	time.Sleep(time.Until(fetchStart.Add(100 * time.Millisecond)))
	cancel()
	if r := <-leader; r.err == nil {
		t.Fatalf("the leader's request was not cancelled: %d (Cache-Status %q)", r.code, r.status())
	}
	protEventually(t, "Shield to see the leader leave", 10*time.Second, func() bool { return protWaiters() < 10 })
	time.Sleep(time.Until(fetchStart.Add(500 * time.Millisecond)))
	if abandoned.Load() {
		t.Fatal("the origin fetch was cancelled when the leader disconnected")
	}
	gate.open()

	for i, r := range wait(t, 20*time.Second) {
		if r.err != nil {
			t.Fatalf("follower %d: %v", i, r.err)
		}
		if r.code != http.StatusOK || r.body != payload {
			t.Fatalf("follower %d: %d, %d bytes (Cache-Status %q), want 200 with %d bytes",
				i, r.code, len(r.body), r.status(), len(payload))
		}
		if !strings.Contains(r.status(), "collapsed") {
			t.Fatalf("follower %d: Cache-Status %q, want it collapsed into the leader's fetch", i, r.status())
		}
	}
	resp, body := get(t, "/report")
	if resp.StatusCode != http.StatusOK || body != payload {
		t.Fatalf("after the fetch: %d, %d bytes", resp.StatusCode, len(body))
	}
	wantStatus(t, resp, "hit")
	wantHits(t, o, 1)
}

// protGoroutines waits for the goroutine count to settle (unchanged over a
// few samples) and returns it.
func protGoroutines() int {
	last, same := runtime.NumGoroutine(), 0
	for deadline := time.Now().Add(3 * time.Second); same < 10 && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
		n := runtime.NumGoroutine()
		if n == last {
			same++
		} else {
			last, same = n, 0
		}
	}
	return last
}

// TestProtectionHungFetchIsAbandoned: a fetch that hangs is abandoned after
// origin_timeout; the next request for the key fetches again and succeeds,
// and no goroutine stays behind.
func TestProtectionHungFetchIsAbandoned(t *testing.T) {
	const keys = 6
	hold := newProtGate() // never opened while the test runs: only Caddy giving up frees a hung handler
	var hung sync.Map
	var hanging atomic.Int64
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		// No keep-alive to the origin, so idle connections do not blur the goroutine count.
		w.Header().Set("Connection", "close")
		if strings.HasPrefix(r.URL.Path, "/hang/") {
			if _, again := hung.LoadOrStore(r.URL.Path, true); !again {
				hanging.Add(1)
				defer hanging.Add(-1)
				hold.wait(r)
				return
			}
		}
		w.Header().Set("Cache-Control", "max-age=60")
		io.WriteString(w, "ok "+r.URL.Path)
	})
	t.Cleanup(hold.open)
	startCaddy(t, "\t\tzone prot-hang\n\t\torigin_timeout 300ms", o.hostPort())
	c := protClient(t, keys, false)

	if r := protGet(context.Background(), c, "/warm"); r.err != nil || r.code != http.StatusOK {
		t.Fatalf("warm-up: %v %d", r.err, r.code)
	}
	baseline := protGoroutines()

	wait := protBurst(c, keys, func(i int) string { return fmt.Sprintf("/hang/%d", i) }, nil)
	for i, r := range wait(t, 20*time.Second) {
		if r.err != nil || r.code != http.StatusGatewayTimeout || !strings.Contains(r.status(), "detail=origin-timeout") {
			t.Fatalf("hung fetch %d: %v %d (Cache-Status %q), want 504 with detail=origin-timeout", i, r.err, r.code, r.status())
		}
	}
	for i := range keys {
		path := fmt.Sprintf("/hang/%d", i)
		r := protGet(context.Background(), c, path)
		if r.err != nil || r.code != http.StatusOK || r.body != "ok "+path {
			t.Fatalf("after the timeout, %s: %v %d %q (Cache-Status %q)", path, r.err, r.code, r.body, r.status())
		}
		if !strings.Contains(r.status(), "stored") {
			t.Fatalf("after the timeout, %s: Cache-Status %q, want a fresh fetch, stored", path, r.status())
		}
	}
	wantHits(t, o, 1+2*keys)

	protEventually(t, "the hung origin handlers to be released", 10*time.Second, func() bool { return hanging.Load() == 0 })
	const slack = 2
	var now int
	deadline := time.Now().Add(10 * time.Second)
	for now = runtime.NumGoroutine(); now > baseline+slack && time.Now().Before(deadline); now = runtime.NumGoroutine() {
		time.Sleep(20 * time.Millisecond)
	}
	if now > baseline+slack {
		buf := make([]byte, 1<<20)
		t.Fatalf("%d goroutines, %d before the hung fetches\n%s", now, baseline, buf[:runtime.Stack(buf, true)])
	}
	t.Logf("%d goroutines, %d before the hung fetches", now, baseline)
}

// TestProtectionSetCookieNotShared: a response that sets a fresh cookie each
// time is uncacheable; of 5 concurrent clients, each gets its own cookie.
func TestProtectionSetCookieNotShared(t *testing.T) {
	const n = 5
	asked, gate := newProtGate(), newProtGate()
	var fetches atomic.Int64
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		k := fetches.Add(1)
		if k == 1 {
			asked.open()
			if !gate.wait(r) {
				return
			}
		}
		who := r.Header.Get("X-Client")
		w.Header().Set("Cache-Control", "max-age=60")
		w.Header().Set("Set-Cookie", fmt.Sprintf("sid=%s.%d; Path=/; HttpOnly", who, k))
		io.WriteString(w, "for "+who)
	})
	t.Cleanup(gate.open)
	startCaddy(t, "\t\tzone prot-cookie", o.hostPort())
	c := protClient(t, n, true)

	wait := protBurst(c, n, func(int) string { return "/account" },
		func(i int) []string { return []string{"X-Client", fmt.Sprintf("client%d", i)} })
	protEventually(t, "the origin to be asked", 10*time.Second, asked.isOpen)
	protWaitForWaiters(t, n) // all 5 wait on the first one's fetch
	gate.open()

	seen := map[string]int{}
	for i, r := range wait(t, 20*time.Second) {
		who := fmt.Sprintf("client%d", i)
		if r.err != nil {
			t.Fatalf("%s: %v", who, r.err)
		}
		cookies := r.header.Values("Set-Cookie")
		if r.code != http.StatusOK || r.body != "for "+who || len(cookies) != 1 || !strings.HasPrefix(cookies[0], "sid="+who+".") {
			t.Fatalf("%s: %d %q with Set-Cookie %q (Cache-Status %q), want its own answer and cookie",
				who, r.code, r.body, cookies, r.status())
		}
		if j, dup := seen[cookies[0]]; dup {
			t.Fatalf("client%d and %s got the same cookie %q", j, who, cookies[0])
		}
		seen[cookies[0]] = i
	}
	wantHits(t, o, n) // each client's request reached the origin once, and only once
}

// TestProtectionStaleWhileRevalidate: 100 concurrent requests inside the
// stale-while-revalidate window are answered at once from the stale copy
// while one background refresh runs; a refresh that fails leaves the stale
// copy in place.
func TestProtectionStaleWhileRevalidate(t *testing.T) {
	const n = 100
	refreshAsked, gate := newProtGate(), newProtGate()
	var fetches atomic.Int64
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		switch fetches.Add(1) {
		case 1: // stored already stale, deep inside its stale-while-revalidate window
			w.Header().Set("Cache-Control", "max-age=1, stale-while-revalidate=600")
			w.Header().Set("Age", "5")
			io.WriteString(w, "v1")
		case 2: // the refresh: held until the test has its answers, then failing
			refreshAsked.open()
			if !gate.wait(r) {
				return
			}
			w.Header().Set("Cache-Control", "max-age=60") // storable, were it not an error
			w.WriteHeader(http.StatusInternalServerError)
			io.WriteString(w, "boom")
		default: // later refreshes succeed
			w.Header().Set("Cache-Control", "max-age=60")
			io.WriteString(w, "v2")
		}
	})
	t.Cleanup(gate.open)
	startCaddy(t, "\t\tzone prot-swr", o.hostPort())

	resp, body := get(t, "/feed")
	want200(t, resp, body, "v1")
	wantStatus(t, resp, "stored")

	// Every answer arrives while the refresh is still held at the origin:
	// none of them waited for it.
	c := protClient(t, n, true)
	wait := protBurst(c, n, func(int) string { return "/feed" }, nil)
	for i, r := range wait(t, 20*time.Second) {
		if r.err != nil || r.code != http.StatusOK || r.body != "v1" {
			t.Fatalf("request %d: %v %d %q (Cache-Status %q), want the stale v1", i, r.err, r.code, r.body, r.status())
		}
		if cs := r.status(); !strings.Contains(cs, "fwd=stale") || !strings.Contains(cs, "detail=stale-while-revalidate") {
			t.Fatalf("request %d: Cache-Status %q, want fwd=stale with detail=stale-while-revalidate", i, cs)
		}
	}
	if gate.isOpen() {
		t.Fatal("gate opened early")
	}
	protEventually(t, "the background refresh to reach the origin", 10*time.Second, refreshAsked.isOpen)
	wantHits(t, o, 2) // the first fetch and one refresh

	// The refresh fails (a 500 that says max-age=60). Until the next refresh,
	// which waits out a backoff, every answer is still the stale v1.
	gate.open()
	protEventually(t, "a second refresh after the failed one", 20*time.Second, func() bool {
		before := fetches.Load()
		resp, body := get(t, "/feed")
		if before < 3 && (resp.StatusCode != http.StatusOK || body != "v1") {
			t.Fatalf("after the failed refresh: %d %q (Cache-Status %q), want the stale v1",
				resp.StatusCode, body, resp.Header.Get("Cache-Status"))
		}
		time.Sleep(20 * time.Millisecond)
		return fetches.Load() >= 3
	})
	protEventually(t, "the successful refresh to be served", 10*time.Second, func() bool {
		resp, body := get(t, "/feed")
		return resp.StatusCode == http.StatusOK && body == "v2" && strings.Contains(resp.Header.Get("Cache-Status"), "hit")
	})
	wantHits(t, o, 3)
}

// TestProtectionStaleIfError: with the origin answering 500, and with the
// origin down, a copy within stale_if_error is answered with the reason in
// Cache-Status; past the window the error passes through.
func TestProtectionStaleIfError(t *testing.T) {
	var failing atomic.Bool
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		if failing.Load() {
			w.WriteHeader(http.StatusInternalServerError)
			io.WriteString(w, "boom")
			return
		}
		// Both copies arrive stale: /within 9s past its lifetime, /past 99s,
		// against a stale_if_error window of 60s.
		age := map[string]string{"/within": "10", "/past": "100"}[r.URL.Path]
		w.Header().Set("Cache-Control", "max-age=1")
		w.Header().Set("Age", age)
		io.WriteString(w, "copy of "+r.URL.Path)
	})
	startCaddy(t, "\t\tzone prot-sie\n\t\tstale_if_error 60s", o.hostPort())

	for _, p := range []string{"/within", "/past"} {
		resp, body := get(t, p)
		want200(t, resp, body, "copy of "+p)
		wantStatus(t, resp, "stored")
	}

	failing.Store(true)
	resp, body := get(t, "/within")
	want200(t, resp, body, "copy of /within")
	wantStatus(t, resp, "fwd=stale", "fwd-status=500", "detail=origin-status-500")
	resp, body = get(t, "/past")
	if resp.StatusCode != http.StatusInternalServerError || body != "boom" {
		t.Fatalf("past the window, origin 500: %d %q (Cache-Status %q), want the origin's 500",
			resp.StatusCode, body, resp.Header.Get("Cache-Status"))
	}
	wantHits(t, o, 4)

	o.Close() // the origin is down: its listener is closed
	resp, body = get(t, "/within")
	want200(t, resp, body, "copy of /within")
	wantStatus(t, resp, "fwd=stale", "detail=origin-error")
	resp, body = get(t, "/past")
	if resp.StatusCode != http.StatusBadGateway {
		t.Fatalf("past the window, origin down: %d %q (Cache-Status %q), want 502",
			resp.StatusCode, body, resp.Header.Get("Cache-Status"))
	}
	wantHits(t, o, 4)
}

// protLoad is an origin that records when each request arrived, for which
// path, and how many it was answering at once.
type protLoad struct {
	mu       sync.Mutex
	arrivals []time.Time
	paths    map[string]int
	inFlight int
	peak     int

	warmed   atomic.Int64
	warmGate atomic.Pointer[protGate]
}

// protWarmRule routes /warm/ around the cache, and so around the budget.
const protWarmRule = "\t\trule /warm/* {\n\t\t\tbypass\n\t\t}\n"

// warm opens n connections from Caddy to the origin before a burst, through
// protWarmRule: n requests held at the origin until all n are there. The
// burst's first fetches then find connections ready instead of queueing on a
// storm of dials, and reach the origin about when they took their tokens.
func (l *protLoad) warm(t *testing.T, c *http.Client, n int) {
	t.Helper()
	gate := newProtGate()
	defer gate.open()
	l.warmGate.Store(gate)
	l.warmed.Store(0)
	wait := protBurst(c, n, func(i int) string { return fmt.Sprintf("/warm/%d", i) }, nil)
	protEventually(t, "the warm-up requests to reach the origin", 10*time.Second, func() bool { return l.warmed.Load() == int64(n) })
	gate.open()
	for i, r := range wait(t, 10*time.Second) {
		if r.err != nil || r.code != http.StatusOK {
			t.Fatalf("warm-up %d: %v %d", i, r.err, r.code)
		}
	}
}

func (l *protLoad) handler(body string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/warm/") {
			l.warmed.Add(1)
			l.warmGate.Load().wait(r)
			return
		}
		l.mu.Lock()
		l.arrivals = append(l.arrivals, time.Now())
		if l.paths == nil {
			l.paths = map[string]int{}
		}
		l.paths[r.URL.Path]++
		l.inFlight++
		l.peak = max(l.peak, l.inFlight)
		l.mu.Unlock()
		time.Sleep(5 * time.Millisecond) // a database query
		l.mu.Lock()
		l.inFlight--
		l.mu.Unlock()
		w.Header().Set("Cache-Control", "max-age=60")
		io.WriteString(w, body+r.URL.Path)
	}
}

// asked reports how many times the origin was asked for path.
func (l *protLoad) asked(path string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.paths[path]
}

// check fails the test unless the origin's load stayed within the budget:
// never more than burst requests at once, and no more requests than the
// tokens the bucket can have given since start (when it was full):
// burst + rate*elapsed, plus one for rounding. Tokens are counted up to the
// last arrival, since a fetch reaches the origin after it took its token.
// Per-window counts are checked too, from the origin's first arrival, with
// lag allowed for the time a fetch takes to reach the origin on a loaded
// machine (two cores, the race detector, 200 clients). It returns how many
// requests arrived.
func (l *protLoad) check(t *testing.T, burst int, perSecond float64, start time.Time) int {
	t.Helper()
	const lag = 500 * time.Millisecond
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.peak > burst {
		t.Fatalf("the origin answered %d requests at once, want at most %d", l.peak, burst)
	}
	n := len(l.arrivals)
	if n == 0 {
		return 0
	}
	last := l.arrivals[n-1]
	if allowed := float64(burst) + perSecond*last.Sub(start).Seconds() + 1; float64(n) > allowed {
		t.Fatalf("%d origin requests within %v, want at most %.1f", n, last.Sub(start), allowed)
	}
	for i, at := range l.arrivals {
		elapsed := at.Sub(l.arrivals[0])
		if allowed := float64(burst) + perSecond*(elapsed+lag).Seconds() + 1; float64(i+1) > allowed {
			t.Fatalf("%d origin requests within %v of the first, want at most %.1f", i+1, elapsed, allowed)
		}
	}
	t.Logf("origin: %d requests, at most %d at once, in %v", n, l.peak, last.Sub(start).Round(time.Millisecond))
	return n
}

const protBudget = "\t\torigin_rate 10/s\n\t\torigin_burst 10\n\t\tmax_wait 1s"

// TestProtectionOriginBudget: 200 distinct cold keys at once against
// origin_rate 10/s and origin_burst 10. The origin sees at most 10 at once and
// 10 a second after; clients that cannot get a fetch within max_wait get 503
// with Retry-After.
func TestProtectionOriginBudget(t *testing.T) {
	const n = 200
	load := &protLoad{}
	o := newOrigin(t, load.handler("fresh "))
	startCaddy(t, "\t\tzone prot-budget\n"+protWarmRule+protBudget, o.hostPort())
	c := protClient(t, n, true)
	load.warm(t, c, 10)

	start := time.Now()
	wait := protBurst(c, n, func(i int) string { return fmt.Sprintf("/item/%d", i) }, nil)
	var ok, rejected int
	var late []string
	for i, r := range wait(t, 30*time.Second) {
		if r.err != nil {
			t.Fatalf("request %d: %v", i, r.err)
		}
		switch r.code {
		case http.StatusOK:
			ok++
			if want := fmt.Sprintf("fresh /item/%d", i); r.body != want {
				t.Fatalf("request %d: %q, want %q", i, r.body, want)
			}
		case http.StatusGatewayTimeout:
			// The budget let this client's fetch start within max_wait, but so
			// near its end that the fetch itself outlasted the client's wait.
			// That is a timeout on a fetch that did happen, not a rejection.
			if !strings.Contains(r.status(), "detail=max-wait") {
				t.Fatalf("request %d: 504 with Cache-Status %q, want detail=max-wait", i, r.status())
			}
			late = append(late, fmt.Sprintf("/item/%d", i))
		case http.StatusServiceUnavailable:
			rejected++
			if s, err := strconv.Atoi(r.header.Get("Retry-After")); err != nil || s < 1 {
				t.Fatalf("request %d: 503 with Retry-After %q, want a number of seconds", i, r.header.Get("Retry-After"))
			}
			if !strings.Contains(r.status(), "detail=origin-budget") {
				t.Fatalf("request %d: 503 with Cache-Status %q, want detail=origin-budget", i, r.status())
			}
		default:
			t.Fatalf("request %d: %d %q (Cache-Status %q), want 200 or 503", i, r.code, r.body, r.status())
		}
	}
	for _, p := range late {
		protEventually(t, "the late fetch of "+p+" to reach the origin", 10*time.Second, func() bool { return load.asked(p) == 1 })
	}
	// Every answer was fetched; a rejected client's fetch may still have
	// started, when its token came due as its wait ran out.
	fetched := load.check(t, 10, 10, start)
	if ok < 10 || rejected == 0 || fetched < ok+len(late) || fetched > ok+len(late)+rejected {
		t.Fatalf("%d answered, %d rejected, %d timed out, %d origin requests: want at least the burst of 10 answered, the rest rejected",
			ok, rejected, len(late), fetched)
	}
	for i := range n {
		if k := load.asked(fmt.Sprintf("/item/%d", i)); k > 1 {
			t.Fatalf("the origin was asked %d times for /item/%d", k, i)
		}
	}
	t.Logf("%d answered, %d rejected with 503, %d timed out waiting on a late fetch", ok, rejected, len(late))
}

// TestProtectionOriginBudgetServesStale: the same overload with a stale copy
// of every key present (within stale_if_error): every client gets a 200.
func TestProtectionOriginBudgetServesStale(t *testing.T) {
	const n = 200
	var warming atomic.Bool
	warming.Store(true)
	load := &protLoad{}
	fresh := load.handler("fresh ")
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		if warming.Load() {
			// Stale on arrival, well inside the stale_if_error window.
			w.Header().Set("Cache-Control", "max-age=1")
			w.Header().Set("Age", "5")
			io.WriteString(w, "stale "+r.URL.Path)
			return
		}
		fresh(w, r)
	})
	path := func(i int) string { return fmt.Sprintf("/item/%d", i) }

	// Warm every key with no budget, then reload the same zone with one.
	startCaddy(t, "\t\tzone prot-budget-stale\n\t\tstale_if_error 10m", o.hostPort())
	c := protClient(t, n, true)
	wait := protBurst(c, n, path, nil)
	for i, r := range wait(t, 30*time.Second) {
		if r.err != nil || r.code != http.StatusOK || !strings.Contains(r.status(), "stored") {
			t.Fatalf("warming %d: %v %d (Cache-Status %q)", i, r.err, r.code, r.status())
		}
	}
	warming.Store(false)
	startCaddy(t, "\t\tzone prot-budget-stale\n\t\tstale_if_error 10m\n"+protWarmRule+protBudget, o.hostPort())
	load.warm(t, c, 10)

	start := time.Now()
	wait = protBurst(c, n, path, nil)
	var stale, fetched int
	for i, r := range wait(t, 30*time.Second) {
		if r.err != nil || r.code != http.StatusOK {
			t.Fatalf("request %d: %v %d %q (Cache-Status %q), want 200", i, r.err, r.code, r.body, r.status())
		}
		switch r.body {
		case "stale " + path(i):
			stale++
			if !strings.Contains(r.status(), "fwd=stale") || !strings.Contains(r.status(), "detail=origin-budget") {
				t.Fatalf("request %d: stale copy with Cache-Status %q, want fwd=stale with detail=origin-budget", i, r.status())
			}
		case "fresh " + path(i):
			fetched++
		default:
			t.Fatalf("request %d: %q", i, r.body)
		}
	}
	if got := load.check(t, 10, 10, start); got < fetched || stale == 0 {
		t.Fatalf("%d stale answers, %d fetched, %d origin requests", stale, fetched, got)
	}
	t.Logf("%d stale answers (origin-budget), %d fetched", stale, fetched)
}

// TestProtectionClientNoCache: a client's Cache-Control: no-cache does not
// reach the origin under the default (client_cache_control ignore), and does
// with client_cache_control honor.
func TestProtectionClientNoCache(t *testing.T) {
	var fetches atomic.Int64
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "max-age=60")
		fmt.Fprintf(w, "fetch %d", fetches.Add(1))
	})
	startCaddy(t, "\t\tzone prot-client-cc\n\t\trule /honor/* {\n\t\t\tclient_cache_control honor\n\t\t}", o.hostPort())

	resp, body := get(t, "/default/a")
	want200(t, resp, body, "fetch 1")
	for _, h := range [][]string{
		{"Cache-Control", "no-cache"},
		{"Cache-Control", "max-age=0"},
		{"Pragma", "no-cache"},
	} {
		resp, body = get(t, "/default/a", h...)
		want200(t, resp, body, "fetch 1")
		wantStatus(t, resp, "hit")
	}
	wantHits(t, o, 1)

	resp, body = get(t, "/honor/a")
	want200(t, resp, body, "fetch 2")
	resp, body = get(t, "/honor/a")
	want200(t, resp, body, "fetch 2")
	wantStatus(t, resp, "hit")
	resp, body = get(t, "/honor/a", "Cache-Control", "no-cache")
	want200(t, resp, body, "fetch 3")
	wantStatus(t, resp, "fwd=request", "stored")
	wantHits(t, o, 3)
}

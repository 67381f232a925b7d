package integration

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig"
)

// The tests of issue 2: Shield as an RFC 9111 shared cache with route
// defaults, end to end through Caddy and a real backend. Each test names its
// own zone, so nothing stored by one test is seen by another.

// waitUntil sleeps until the clock has passed deadline. Expiry tests wait this
// way, for a deadline computed from when the client received the response:
// an entry's age is at least the time since then, so it is surely stale after.
func waitUntil(deadline time.Time) {
	for d := time.Until(deadline); d > 0; d = time.Until(deadline) {
		time.Sleep(d)
	}
}

// margin is added to expiry deadlines so that whole-second Age arithmetic
// cannot leave an entry fresh at the instant the test looks.
const margin = 100 * time.Millisecond

// doHost is do for a request naming another host (another site of the same
// listener), so that tests can store entries under a second host.
func doHost(t *testing.T, method, host, path string, header ...string) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(method, base+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Host = host
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Add(header[i], header[i+1])
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s%s: %v", method, host, path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s%s: reading body: %v", method, host, path, err)
	}
	return resp, string(body)
}

// want fails the test unless the response has the status code and body given.
func want(t *testing.T, resp *http.Response, body string, code int, wantBody string) {
	t.Helper()
	if resp.StatusCode != code || body != wantBody {
		t.Fatalf("got %d %q, want %d %q (Cache-Status %q)", resp.StatusCode, body, code, wantBody, resp.Header.Get("Cache-Status"))
	}
}

// wantNotStatus fails the test if Cache-Status contains any part given.
func wantNotStatus(t *testing.T, resp *http.Response, parts ...string) {
	t.Helper()
	cs := cacheStatus(t, resp)
	for _, p := range parts {
		if strings.Contains(cs, p) {
			t.Fatalf("Cache-Status = %q, want it without %q", cs, p)
		}
	}
}

// wantAge fails the test unless Age is a whole number of seconds in [lo, hi].
func wantAge(t *testing.T, resp *http.Response, lo, hi int) {
	t.Helper()
	v := resp.Header.Get("Age")
	n, err := strconv.Atoi(v)
	if err != nil || n < lo || n > hi {
		t.Fatalf("Age = %q, want a number in [%d, %d] (Cache-Status %q)", v, lo, hi, resp.Header.Get("Cache-Status"))
	}
}

// wantNoAge fails the test if the response carries Age: it came from the origin.
func wantNoAge(t *testing.T, resp *http.Response) {
	t.Helper()
	if v, ok := resp.Header["Age"]; ok {
		t.Fatalf("Age = %q on an answer straight from the origin (Cache-Status %q)", v, resp.Header.Get("Cache-Status"))
	}
}

// hitTTL returns the ttl=N of a hit's Cache-Status.
func hitTTL(t *testing.T, resp *http.Response) int {
	t.Helper()
	cs := cacheStatus(t, resp)
	for _, p := range strings.Split(cs, ";") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(p), "ttl="); ok {
			n, err := strconv.Atoi(v)
			if err != nil {
				t.Fatalf("Cache-Status = %q: bad ttl", cs)
			}
			return n
		}
	}
	t.Fatalf("Cache-Status = %q, want a ttl", cs)
	return 0
}

// recorder keeps what the origin was asked, for tests that check the request
// Shield sent (method, conditional headers).
type recorder struct {
	mu   sync.Mutex
	reqs []*http.Request
}

func (rc *recorder) add(r *http.Request) {
	rc.mu.Lock()
	rc.reqs = append(rc.reqs, r.Clone(r.Context()))
	rc.mu.Unlock()
}

func (rc *recorder) all() []*http.Request {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return append([]*http.Request(nil), rc.reqs...)
}

func TestMissThenHit(t *testing.T) {
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "max-age=60")
		w.Header().Set("X-Origin", "yes")
		io.WriteString(w, "hello "+r.URL.Path)
	})
	startCaddy(t, "\t\tzone core-hit", o.hostPort())

	resp, body := get(t, "/a")
	want(t, resp, body, 200, "hello /a")
	wantStatus(t, resp, "fwd=uri-miss", "fwd-status=200", "stored")
	wantAge(t, resp, 0, 1)
	wantHits(t, o, 1)

	for i := 0; i < 3; i++ {
		resp, body = get(t, "/a")
		want(t, resp, body, 200, "hello /a")
		wantStatus(t, resp, "shield; hit; ttl=")
		wantNotStatus(t, resp, "fwd=")
		if ttl := hitTTL(t, resp); ttl < 55 || ttl > 60 {
			t.Fatalf("hit ttl=%d, want about 60", ttl)
		}
		wantAge(t, resp, 0, 2)
		if resp.Header.Get("X-Origin") != "yes" {
			t.Fatalf("stored header lost: %v", resp.Header)
		}
	}
	wantHits(t, o, 1)

	// Another path is another entry.
	resp, body = get(t, "/b")
	want(t, resp, body, 200, "hello /b")
	wantStatus(t, resp, "fwd=uri-miss", "stored")
	wantHits(t, o, 2)
}

func TestTTLExpiry(t *testing.T) {
	var version atomicCounter
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		// No freshness from the origin: the rule's ttl decides.
		fmt.Fprintf(w, "v%d", version.add())
	})
	// 2s leaves a fresh window even when the origin's whole-second Date
	// makes the stored response up to a second old on arrival.
	startCaddy(t, "\t\tzone core-ttl\n\t\tttl 2s", o.hostPort())

	resp, body := get(t, "/t")
	received := time.Now()
	want(t, resp, body, 200, "v1")
	wantStatus(t, resp, "fwd=uri-miss", "stored")

	resp, body = get(t, "/t")
	want(t, resp, body, 200, "v1")
	wantStatus(t, resp, "hit")
	if ttl := hitTTL(t, resp); ttl > 2 {
		t.Fatalf("hit ttl=%d, want at most the rule's 2s", ttl)
	}
	wantAge(t, resp, 0, 1)
	wantHits(t, o, 1)

	waitUntil(received.Add(2*time.Second + margin))
	resp, body = get(t, "/t")
	want(t, resp, body, 200, "v2")
	wantStatus(t, resp, "fwd=stale", "fwd-status=200", "stored")
	wantHits(t, o, 2)

	resp, body = get(t, "/t")
	want(t, resp, body, 200, "v2")
	wantStatus(t, resp, "hit")
	wantHits(t, o, 2)
}

func TestOriginMaxAgeOverridesTTL(t *testing.T) {
	var version atomicCounter
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "max-age=2")
		fmt.Fprintf(w, "v%d", version.add())
	})
	startCaddy(t, "\t\tzone core-honor\n\t\tttl 1h", o.hostPort())

	resp, body := get(t, "/m")
	received := time.Now()
	want(t, resp, body, 200, "v1")
	wantStatus(t, resp, "fwd=uri-miss", "stored")

	resp, body = get(t, "/m")
	want(t, resp, body, 200, "v1")
	wantStatus(t, resp, "hit")
	if ttl := hitTTL(t, resp); ttl > 2 {
		t.Fatalf("hit ttl=%d: the rule's 1h won over the origin's max-age=2", ttl)
	}
	wantHits(t, o, 1)

	waitUntil(received.Add(2*time.Second + margin))
	resp, body = get(t, "/m")
	want(t, resp, body, 200, "v2")
	wantStatus(t, resp, "fwd=stale", "stored")
	wantHits(t, o, 2)
}

func TestIgnoreOriginCacheControlLetsTTLWin(t *testing.T) {
	var version atomicCounter
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		if strings.HasSuffix(r.URL.Path, "/nostore") {
			w.Header().Set("Cache-Control", "no-store")
		} else {
			w.Header().Set("Cache-Control", "max-age=1")
		}
		fmt.Fprintf(w, "v%d", version.add())
	})
	startCaddy(t, `		zone core-ignore
		rule /api/* {
			ttl 1h
			origin_cache_control ignore
		}`, o.hostPort())

	resp, body := get(t, "/api/x")
	received := time.Now()
	want(t, resp, body, 200, "v1")
	wantStatus(t, resp, "fwd=uri-miss", "stored")

	waitUntil(received.Add(1*time.Second + margin))
	resp, body = get(t, "/api/x")
	want(t, resp, body, 200, "v1")
	wantStatus(t, resp, "hit")
	if ttl := hitTTL(t, resp); ttl < 3500 {
		t.Fatalf("hit ttl=%d, want the rule's 1h to win over max-age=1", ttl)
	}
	wantAge(t, resp, 1, 3)
	wantHits(t, o, 1)

	// Outside the rule, the origin's max-age=1 holds.
	resp, _ = get(t, "/other")
	received = time.Now()
	wantStatus(t, resp, "stored")
	waitUntil(received.Add(1*time.Second + margin))
	resp, _ = get(t, "/other")
	wantStatus(t, resp, "fwd=stale")
	wantHits(t, o, 3)

	// ignore never overrides no-store.
	resp, _ = get(t, "/api/nostore")
	wantStatus(t, resp, "detail=no-store")
	wantNotStatus(t, resp, "stored")
	resp, _ = get(t, "/api/nostore")
	wantNotStatus(t, resp, "hit")
	wantHits(t, o, 5)
}

func TestBypass(t *testing.T) {
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "public, max-age=60")
		io.WriteString(w, "ok "+r.URL.Path)
	})
	startCaddy(t, `		zone core-bypass
		ttl 1m
		rule /pay/* /me {
			bypass
		}`, o.hostPort())

	for _, path := range []string{"/pay/1", "/me"} {
		for i := 0; i < 2; i++ {
			resp, body := get(t, path)
			want(t, resp, body, 200, "ok "+path)
			if cs := cacheStatus(t, resp); cs != "shield; fwd=bypass" {
				t.Fatalf("Cache-Status = %q, want shield; fwd=bypass", cs)
			}
			wantNoAge(t, resp)
		}
	}
	wantHits(t, o, 4)

	// Paths outside the bypass rule are cached by the same block.
	get(t, "/catalog")
	resp, body := get(t, "/catalog")
	want(t, resp, body, 200, "ok /catalog")
	wantStatus(t, resp, "hit")
	wantHits(t, o, 5)
}

func TestNotStored(t *testing.T) {
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		switch r.URL.Path {
		case "/no-store":
			h.Set("Cache-Control", "no-store, max-age=60")
		case "/private":
			h.Set("Cache-Control", "private, max-age=60")
		case "/cookie":
			h.Set("Cache-Control", "max-age=60")
			h.Set("Set-Cookie", "session=abc")
		default:
			h.Set("Cache-Control", "max-age=60")
		}
		io.WriteString(w, "body "+r.URL.Path)
	})
	// A rule ttl must not make any of these storable.
	startCaddy(t, "\t\tzone core-notstored\n\t\tttl 1h", o.hostPort())

	var hits int64
	for _, tc := range []struct{ path, detail string }{
		{"/no-store", "detail=no-store"},
		{"/private", "detail=private"},
		{"/cookie", "detail=set-cookie"},
	} {
		t.Run(tc.path, func(t *testing.T) {
			resp, body := get(t, tc.path)
			want(t, resp, body, 200, "body "+tc.path)
			wantStatus(t, resp, "fwd=uri-miss", tc.detail)
			wantNotStatus(t, resp, "stored")
			wantNoAge(t, resp)
			hits++
			wantHits(t, o, hits)
			for i := 0; i < 2; i++ {
				resp, body = get(t, tc.path)
				want(t, resp, body, 200, "body "+tc.path)
				wantNotStatus(t, resp, "hit", "stored")
				wantNoAge(t, resp)
				hits++
				wantHits(t, o, hits)
			}
			if tc.path == "/cookie" && resp.Header.Get("Set-Cookie") != "session=abc" {
				t.Fatalf("the client's own Set-Cookie was lost: %v", resp.Header)
			}
		})
	}
}

func TestAuthorization(t *testing.T) {
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/public" {
			w.Header().Set("Cache-Control", "public, max-age=60")
		} else {
			w.Header().Set("Cache-Control", "max-age=60")
		}
		io.WriteString(w, "for "+r.Header.Get("Authorization"))
	})
	startCaddy(t, "\t\tzone core-auth\n\t\tttl 1h", o.hostPort())

	// A response to an authenticated request is not stored unless it says it may be shared.
	resp, body := get(t, "/secret", "Authorization", "Bearer alice")
	want(t, resp, body, 200, "for Bearer alice")
	wantStatus(t, resp, "detail=authorization")
	wantNotStatus(t, resp, "stored")
	wantNoAge(t, resp)

	resp, body = get(t, "/secret", "Authorization", "Bearer bob")
	want(t, resp, body, 200, "for Bearer bob")
	wantNotStatus(t, resp, "hit", "stored")
	wantHits(t, o, 2)

	// Nor is it served to anyone else; and one client's credentials do not
	// stop the URL from being cached for the others.
	resp, body = get(t, "/secret")
	want(t, resp, body, 200, "for ")
	wantStatus(t, resp, "stored")
	resp, body = get(t, "/secret")
	want(t, resp, body, 200, "for ")
	wantStatus(t, resp, "hit")
	wantHits(t, o, 3)

	// public lets a shared cache store it (RFC 9111 §3.5).
	resp, body = get(t, "/public", "Authorization", "Bearer alice")
	want(t, resp, body, 200, "for Bearer alice")
	wantStatus(t, resp, "fwd=uri-miss", "stored")
	resp, body = get(t, "/public", "Authorization", "Bearer alice")
	want(t, resp, body, 200, "for Bearer alice")
	wantStatus(t, resp, "hit")
	wantAge(t, resp, 0, 2)
	wantHits(t, o, 4)
}

func TestVary(t *testing.T) {
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "max-age=60")
		if r.URL.Path == "/star" {
			w.Header().Set("Vary", "*")
		} else {
			w.Header().Set("Vary", "Accept-Language")
		}
		io.WriteString(w, "hello-"+r.Header.Get("Accept-Language"))
	})
	startCaddy(t, "\t\tzone core-vary", o.hostPort())

	resp, body := get(t, "/v", "Accept-Language", "en")
	want(t, resp, body, 200, "hello-en")
	wantStatus(t, resp, "fwd=uri-miss", "stored")

	resp, body = get(t, "/v", "Accept-Language", "fr")
	want(t, resp, body, 200, "hello-fr")
	wantStatus(t, resp, "fwd=vary-miss", "stored")
	wantHits(t, o, 2)

	for i := 0; i < 2; i++ {
		for _, lang := range []string{"en", "fr"} {
			resp, body = get(t, "/v", "Accept-Language", lang)
			want(t, resp, body, 200, "hello-"+lang)
			wantStatus(t, resp, "hit")
			wantAge(t, resp, 0, 2)
		}
	}
	wantHits(t, o, 2)

	// Without the header is a third variant.
	resp, body = get(t, "/v")
	want(t, resp, body, 200, "hello-")
	wantStatus(t, resp, "fwd=vary-miss")
	wantHits(t, o, 3)

	// Vary: * is never stored.
	resp, body = get(t, "/star", "Accept-Language", "en")
	want(t, resp, body, 200, "hello-en")
	wantStatus(t, resp, "detail=vary-star")
	wantNotStatus(t, resp, "stored")
	resp, body = get(t, "/star", "Accept-Language", "en")
	want(t, resp, body, 200, "hello-en")
	wantNotStatus(t, resp, "hit", "stored")
	wantHits(t, o, 5)
}

func TestHead(t *testing.T) {
	var rec recorder
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		rec.add(r)
		w.Header().Set("Cache-Control", "max-age=60")
		io.WriteString(w, "full body "+r.URL.Path)
	})
	startCaddy(t, "\t\tzone core-head", o.hostPort())

	// HEAD after GET: answered from the GET entry, without a body.
	resp, body := get(t, "/warm")
	want(t, resp, body, 200, "full body /warm")
	resp, body = do(t, http.MethodHead, "/warm")
	want(t, resp, body, 200, "")
	wantStatus(t, resp, "hit")
	wantAge(t, resp, 0, 2)
	if resp.ContentLength != int64(len("full body /warm")) {
		t.Fatalf("HEAD Content-Length = %d, want the GET body's %d", resp.ContentLength, len("full body /warm"))
	}
	wantHits(t, o, 1)

	// A cold HEAD fills the cache with the full GET response.
	resp, body = do(t, http.MethodHead, "/cold")
	want(t, resp, body, 200, "")
	wantStatus(t, resp, "fwd=uri-miss", "stored")
	wantHits(t, o, 2)
	resp, body = get(t, "/cold")
	want(t, resp, body, 200, "full body /cold")
	wantStatus(t, resp, "hit")
	wantHits(t, o, 2)

	for _, r := range rec.all() {
		if r.Method != http.MethodGet {
			t.Fatalf("origin was asked %s %s, want GET (a HEAD must fill the cache with a GET)", r.Method, r.URL.Path)
		}
	}
}

func TestUnsafeMethodInvalidates(t *testing.T) {
	var version atomicCounter
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		switch r.Method {
		case http.MethodGet:
			w.Header().Set("Cache-Control", "max-age=60")
			fmt.Fprintf(w, "%s v%d", r.URL.Path, version.add())
		case http.MethodPost:
			if r.URL.Path == "/fail" {
				w.WriteHeader(http.StatusInternalServerError)
				return
			}
			io.WriteString(w, "posted")
		case http.MethodPut:
			if loc := r.URL.Query().Get("loc"); loc != "" {
				w.Header().Set("Location", loc)
			}
			if cl := r.URL.Query().Get("cl"); cl != "" {
				w.Header().Set("Content-Location", cl)
			}
			w.WriteHeader(http.StatusCreated)
		}
	})
	const other = "other.test:9080"
	startCaddyfile(t, fmt.Sprintf(`http://localhost:9080 {
	shield {
		zone core-unsafe
	}
	reverse_proxy %[1]s
}
http://other.test:9080 {
	shield {
		zone core-unsafe
	}
	reverse_proxy %[1]s
}`, o.hostPort()))

	stored := func(path, wantBody string) {
		t.Helper()
		resp, body := get(t, path)
		want(t, resp, body, 200, wantBody)
		wantStatus(t, resp, "hit")
	}
	missed := func(path, wantBody string) {
		t.Helper()
		resp, body := get(t, path)
		want(t, resp, body, 200, wantBody)
		wantStatus(t, resp, "fwd=uri-miss", "stored")
	}

	missed("/item", "/item v1")
	stored("/item", "/item v1")

	// POST to the URL.
	resp, body := do(t, http.MethodPost, "/item")
	want(t, resp, body, 200, "posted")
	wantStatus(t, resp, "fwd=method")
	missed("/item", "/item v2")
	stored("/item", "/item v2")

	// A failed POST changes nothing.
	missed("/fail", "/fail v3")
	resp, _ = do(t, http.MethodPost, "/fail")
	if resp.StatusCode != 500 {
		t.Fatalf("POST /fail: %d", resp.StatusCode)
	}
	stored("/fail", "/fail v3")

	// A PUT whose response names a same-origin Location, relative or absolute.
	resp, _ = do(t, http.MethodPut, "/items?loc=/item")
	if resp.StatusCode != 201 {
		t.Fatalf("PUT: %d", resp.StatusCode)
	}
	missed("/item", "/item v4")
	do(t, http.MethodPut, "/items?loc=http://localhost:9080/item")
	missed("/item", "/item v5")
	do(t, http.MethodPut, "/items?cl=/item")
	missed("/item", "/item v6")
	stored("/item", "/item v6")

	// Another host's entry in the same zone: a cross-host Location must not touch it.
	resp, body = doHost(t, http.MethodGet, other, "/item")
	want(t, resp, body, 200, "/item v7")
	wantStatus(t, resp, "stored")
	do(t, http.MethodPut, "/items?loc=http://"+other+"/item")
	resp, body = doHost(t, http.MethodGet, other, "/item")
	want(t, resp, body, 200, "/item v7")
	wantStatus(t, resp, "hit")
	// ... while that host's own PUT does.
	doHost(t, http.MethodPut, other, "/items?loc=/item")
	resp, body = doHost(t, http.MethodGet, other, "/item")
	want(t, resp, body, 200, "/item v8")
	wantStatus(t, resp, "fwd=uri-miss")
	stored("/item", "/item v6")

	wantHits(t, o, 15)
}

func TestRevalidation304(t *testing.T) {
	var mu sync.Mutex
	var conditional []string
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("ETag", `"v1"`)
		if inm := r.Header.Get("If-None-Match"); inm != "" {
			mu.Lock()
			conditional = append(conditional, inm)
			mu.Unlock()
			if inm == `"v1"` {
				// The 304 refreshes freshness and stored header fields.
				w.Header().Set("Cache-Control", "max-age=60")
				w.Header().Set("X-Rev", "2")
				w.WriteHeader(http.StatusNotModified)
				return
			}
		}
		w.Header().Set("Cache-Control", "max-age=1")
		w.Header().Set("X-Rev", "1")
		io.WriteString(w, "the stored body")
	})
	startCaddy(t, "\t\tzone core-304", o.hostPort())

	resp, body := get(t, "/r")
	received := time.Now()
	want(t, resp, body, 200, "the stored body")
	wantStatus(t, resp, "fwd=uri-miss", "stored")
	wantHits(t, o, 1)

	waitUntil(received.Add(1*time.Second + margin))
	resp, body = get(t, "/r")
	want(t, resp, body, 200, "the stored body")
	wantStatus(t, resp, "fwd=stale", "fwd-status=304", "stored")
	wantAge(t, resp, 0, 1)
	if resp.Header.Get("X-Rev") != "2" || resp.Header.Get("ETag") != `"v1"` {
		t.Fatalf("304 did not refresh the stored header: %v", resp.Header)
	}
	wantHits(t, o, 2)
	mu.Lock()
	got := append([]string(nil), conditional...)
	mu.Unlock()
	if len(got) != 1 || got[0] != `"v1"` {
		t.Fatalf("origin saw If-None-Match %q, want one request with \"v1\"", got)
	}

	// Fresh again for the 304's max-age=60.
	resp, body = get(t, "/r")
	want(t, resp, body, 200, "the stored body")
	wantStatus(t, resp, "hit")
	if ttl := hitTTL(t, resp); ttl < 55 {
		t.Fatalf("hit ttl=%d after a 304 with max-age=60", ttl)
	}
	if resp.Header.Get("X-Rev") != "2" {
		t.Fatalf("refreshed header not stored: %v", resp.Header)
	}
	wantHits(t, o, 2)
}

func TestClientConditionalFromFreshEntry(t *testing.T) {
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "max-age=60")
		w.Header().Set("ETag", `"abc"`)
		io.WriteString(w, "payload")
	})
	startCaddy(t, "\t\tzone core-inm", o.hostPort())

	resp, body := get(t, "/c")
	want(t, resp, body, 200, "payload")

	resp, body = get(t, "/c", "If-None-Match", `"abc"`)
	want(t, resp, body, http.StatusNotModified, "")
	wantStatus(t, resp, "hit")
	wantAge(t, resp, 0, 2)
	if resp.Header.Get("ETag") != `"abc"` {
		t.Fatalf("304 without the ETag: %v", resp.Header)
	}

	resp, body = get(t, "/c", "If-None-Match", `W/"abc", "zzz"`)
	want(t, resp, body, http.StatusNotModified, "")

	resp, body = get(t, "/c", "If-None-Match", `"other"`)
	want(t, resp, body, 200, "payload")
	wantStatus(t, resp, "hit")
	wantHits(t, o, 1)
}

func TestTruncatedBodyNotStored(t *testing.T) {
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		conn, buf, err := http.NewResponseController(w).Hijack()
		if err != nil {
			t.Errorf("hijack: %v", err)
			return
		}
		defer conn.Close()
		// Promise 100 bytes, send 10, hang up.
		fmt.Fprintf(buf, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nCache-Control: max-age=60\r\nContent-Length: 100\r\n\r\n0123456789")
		buf.Flush()
	})
	startCaddy(t, "\t\tzone core-trunc\n\t\tttl 1h", o.hostPort())

	for i := int64(1); i <= 3; i++ {
		resp, body := get(t, "/trunc")
		if resp.StatusCode == 200 && body == "0123456789" {
			t.Fatalf("a truncated body was served as complete")
		}
		if resp.StatusCode != http.StatusBadGateway {
			t.Fatalf("status %d, want 502 for a truncated origin body", resp.StatusCode)
		}
		wantStatus(t, resp, "detail=origin-error")
		wantNotStatus(t, resp, "hit", "stored")
		wantNoAge(t, resp)
		wantHits(t, o, i) // never stored: each request asks the origin again
	}
}

func TestLargeBodyStreamsUncached(t *testing.T) {
	const size = 64 << 10
	const half = size / 2
	payload := bytes.Repeat([]byte("0123456789abcdef"), size/16)
	for _, mode := range []string{"content-length", "chunked"} {
		t.Run(mode, func(t *testing.T) {
			release := make(chan struct{})
			var releaseOnce sync.Once
			unblock := func() { releaseOnce.Do(func() { close(release) }) }
			t.Cleanup(unblock)
			o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Cache-Control", "max-age=60")
				if mode == "content-length" {
					w.Header().Set("Content-Length", strconv.Itoa(size))
				}
				w.Write(payload[:half])
				http.NewResponseController(w).Flush()
				// The second half waits for the test to have received the
				// first: a cache that buffered the whole body would never send it.
				select {
				case <-release:
				case <-r.Context().Done():
					return
				}
				w.Write(payload[half:])
			})
			startCaddy(t, "\t\tzone core-large-"+mode+"\n\t\tmax_object_size 1KiB", o.hostPort())

			resp, err := client.Get(base + "/big")
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			if resp.StatusCode != 200 {
				t.Fatalf("status %d", resp.StatusCode)
			}
			wantStatus(t, resp, "detail=too-large")
			wantNotStatus(t, resp, "stored")
			wantNoAge(t, resp)
			first := make(chan error, 1)
			got := make([]byte, size)
			go func() {
				_, err := io.ReadFull(resp.Body, got[:half/2])
				first <- err
			}()
			select {
			case err := <-first:
				if err != nil {
					t.Fatalf("reading the first part: %v", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("the first part of a large body did not reach the client before the origin finished: not streamed")
			}
			unblock()
			if _, err := io.ReadFull(resp.Body, got[half/2:]); err != nil {
				t.Fatalf("reading the rest: %v", err)
			}
			if n, _ := io.Copy(io.Discard, resp.Body); n != 0 || !bytes.Equal(got, payload) {
				t.Fatalf("body differs from the origin's (%d extra bytes)", n)
			}
			// Finding out it is too large may cost one extra origin request
			// (the capture attempt is abandoned, the client's own request
			// streams), never more.
			if n := o.hits.Load(); n < 1 || n > 2 {
				t.Fatalf("origin saw %d requests for one large response, want 1 or 2", n)
			}
			firstHits := o.hits.Load()

			// Not stored: each later request goes to the origin again, once.
			for i := int64(1); i <= 2; i++ {
				resp2, body := get(t, "/big")
				want(t, resp2, body, 200, string(payload))
				wantNotStatus(t, resp2, "hit", "stored")
				wantNoAge(t, resp2)
				wantHits(t, o, firstHits+i)
			}
		})
	}
}

func TestQueryOrderNormalized(t *testing.T) {
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "max-age=60")
		io.WriteString(w, "q="+r.URL.RawQuery)
	})
	startCaddy(t, "\t\tzone core-query", o.hostPort())

	resp, body := get(t, "/s?a=1&b=2")
	want(t, resp, body, 200, "q=a=1&b=2")
	wantStatus(t, resp, "fwd=uri-miss", "stored")
	resp, body = get(t, "/s?b=2&a=1")
	want(t, resp, body, 200, "q=a=1&b=2")
	wantStatus(t, resp, "hit")
	wantHits(t, o, 1)

	// Different values are different entries.
	resp, _ = get(t, "/s?a=1&b=3")
	wantStatus(t, resp, "fwd=uri-miss")
	wantHits(t, o, 2)
}

const globals = `{
	skip_install_trust
	admin localhost:2999
	http_port 9080
	https_port 9443
	grace_period 1ns
}
`

func TestBadCaddyfileRejectedWithLine(t *testing.T) {
	// Through the adapter, as `caddy adapt` does: the error names the file's line.
	for _, tc := range []struct {
		name, block string
		line        int
		wantErr     string
	}{
		{"unknown subdirective", "zone z\n\t\tcolor blue", 4, `unrecognized subdirective "color"`},
		{"bad duration", "zone z\n\t\tttl forever", 4, `invalid ttl "forever"`},
		{"bad size", "memory lots", 3, `invalid memory "lots"`},
		{"duplicate option", "ttl 1s\n\t\tttl 2s", 4, "ttl already specified"},
		{"ttl on bypass rule", "zone z\n\t\trule /pay/* {\n\t\t\tbypass\n\t\t\tttl 1m\n\t\t}", 7, "ttl cannot be set on a bypass rule"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := "http://localhost:9080 {\n\tshield {\n\t\t" + tc.block + "\n\t}\n\treverse_proxy localhost:1\n}\n"
			_, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cfg), map[string]any{"filename": "Caddyfile"})
			if err == nil {
				t.Fatalf("adapting\n%s\nsucceeded, want an error", cfg)
			}
			if !namesLine(err.Error(), tc.line) || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("error %q, want it to name Caddyfile:%d and say %q", err, tc.line, tc.wantErr)
			}
		})
	}

	// Through a running Caddy, as `caddy run` and reload do: the load fails,
	// the error names the line, and the running config keeps serving.
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "max-age=60")
		io.WriteString(w, "still here")
	})
	startCaddy(t, "\t\tzone core-badfile", o.hostPort())
	get(t, "/x")
	bad := globals + `http://localhost:9080 {
	shield {
		zone core-badfile
		max_object_size huge
	}
	reverse_proxy ` + o.hostPort() + `
}
`
	errText := loadConfigRaw(t, bad)
	if errText == "" {
		t.Fatal("a Caddyfile with a bad size loaded")
	}
	if !namesLine(errText, 11) || !strings.Contains(errText, `invalid max_object_size "huge"`) {
		t.Fatalf("load error %q, want it to name Caddyfile:11 and the bad size", errText)
	}
	resp, body := get(t, "/x")
	want(t, resp, body, 200, "still here")
	wantStatus(t, resp, "hit")
}

// namesLine reports whether a Caddyfile error names exactly that line.
func namesLine(errText string, line int) bool {
	return regexp.MustCompile(`\bCaddyfile:` + strconv.Itoa(line) + `\b`).MatchString(errText)
}

// loadConfigRaw posts a Caddyfile to the running test Caddy and returns the
// error it answered, or "" when it loaded.
func loadConfigRaw(t *testing.T, caddyfile string) string {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, "http://localhost:2999/load", strings.NewReader(caddyfile))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "text/caddyfile")
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode == http.StatusOK {
		return ""
	}
	var answer struct{ Error string }
	if err := json.Unmarshal(body, &answer); err != nil || answer.Error == "" {
		return string(body)
	}
	return answer.Error
}

func TestZoneDeclaredTwiceWithDifferentSizes(t *testing.T) {
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "max-age=60")
		io.WriteString(w, "ok")
	})
	startCaddy(t, "\t\tzone core-twice-base", o.hostPort())

	site := func(host, memory string) string {
		return fmt.Sprintf(`http://%s {
	shield {
		zone core-twice
		memory %s
	}
	reverse_proxy %s
}
`, host, memory, o.hostPort())
	}
	errText := loadConfigRaw(t, globals+site("localhost:9080", "8MiB")+site("other.test:9080", "16MiB"))
	if !strings.Contains(errText, `zone "core-twice" is declared twice with different sizes`) {
		t.Fatalf("load error %q, want the zone declared twice with different sizes", errText)
	}

	// The same size twice is one shared zone, and the config loads.
	if errText := loadConfigRaw(t, globals+site("localhost:9080", "8MiB")+site("other.test:9080", "8MiB")); errText != "" {
		t.Fatalf("two blocks sharing a zone with one size: %s", errText)
	}
	resp, body := get(t, "/z")
	want(t, resp, body, 200, "ok")
	wantStatus(t, resp, "stored")
}

// atomicCounter numbers origin responses.
type atomicCounter struct {
	mu sync.Mutex
	n  int
}

func (c *atomicCounter) add() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.n++
	return c.n
}

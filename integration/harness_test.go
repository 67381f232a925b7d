// Package integration tests Shield inside a real Caddy (started in-process by
// caddytest) in front of real HTTP backends (httptest servers).
package integration

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"

	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/shieldcache/shield/caddymodule"
)

// base is where the test Caddy listens; one Caddy runs per test binary, so
// tests in this package never call t.Parallel.
const base = "http://localhost:9080"

// origin is a real backend that counts the requests it receives.
type origin struct {
	*httptest.Server
	hits atomic.Int64
}

// newOrigin starts a counting backend; it is closed when the test ends.
func newOrigin(t *testing.T, handler http.HandlerFunc) *origin {
	t.Helper()
	o := &origin{}
	o.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		o.hits.Add(1)
		handler(w, r)
	}))
	t.Cleanup(o.Close)
	return o
}

// hostPort is the origin's address as reverse_proxy wants it.
func (o *origin) hostPort() string { return strings.TrimPrefix(o.URL, "http://") }

// startCaddy loads a config with one site at base: the given shield block
// body (without braces) in front of reverse_proxy to upstream. Every test
// names its own zone so that no entry survives from one test into another.
func startCaddy(t *testing.T, shieldBody, upstream string) *caddytest.Tester {
	t.Helper()
	return startCaddyfile(t, fmt.Sprintf(`http://localhost:9080 {
	shield {
%s
	}
	reverse_proxy %s
}`, shieldBody, upstream))
}

// startCaddyfile loads a full site block (or blocks) under the test globals.
func startCaddyfile(t *testing.T, sites string) *caddytest.Tester {
	t.Helper()
	tester := caddytest.NewTester(t)
	tester.InitServer(`{
	skip_install_trust
	admin localhost:2999
	http_port 9080
	https_port 9443
	grace_period 1ns
}
`+sites, "caddyfile")
	return tester
}

// client talks to the test Caddy; it never follows redirects and has a
// generous timeout so a hung server fails the test rather than the run.
var client = &http.Client{
	Timeout: 30 * time.Second,
	CheckRedirect: func(*http.Request, []*http.Request) error {
		return http.ErrUseLastResponse
	},
}

// do sends a request to the test Caddy and returns the response with its body read.
func do(t *testing.T, method, path string, header ...string) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(method, base+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Add(header[i], header[i+1])
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: reading body: %v", method, path, err)
	}
	return resp, string(body)
}

// get is do for GET.
func get(t *testing.T, path string, header ...string) (*http.Response, string) {
	t.Helper()
	return do(t, http.MethodGet, path, header...)
}

// cacheStatus returns the response's Cache-Status, failing the test if it is
// missing or not Shield's.
func cacheStatus(t *testing.T, resp *http.Response) string {
	t.Helper()
	cs := resp.Header.Get("Cache-Status")
	if !strings.HasPrefix(cs, "shield;") {
		t.Fatalf("Cache-Status = %q, want one from shield", cs)
	}
	return cs
}

// wantStatus fails the test unless Cache-Status contains every part given.
func wantStatus(t *testing.T, resp *http.Response, parts ...string) {
	t.Helper()
	cs := cacheStatus(t, resp)
	for _, p := range parts {
		if !strings.Contains(cs, p) {
			t.Fatalf("Cache-Status = %q, want it to contain %q", cs, p)
		}
	}
}

// wantHits fails the test unless the origin saw exactly n requests.
func wantHits(t *testing.T, o *origin, n int64) {
	t.Helper()
	if got := o.hits.Load(); got != n {
		t.Fatalf("origin saw %d requests, want %d", got, n)
	}
}

// TestHarnessMissThenHit is the smallest end-to-end check: a miss stores, a hit
// is served without the origin.
func TestHarnessMissThenHit(t *testing.T) {
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "max-age=60")
		io.WriteString(w, "v1")
	})
	startCaddy(t, "\t\tzone harness", o.hostPort())
	resp, body := get(t, "/a")
	if resp.StatusCode != 200 || body != "v1" {
		t.Fatalf("miss: %d %q", resp.StatusCode, body)
	}
	wantStatus(t, resp, "fwd=uri-miss", "stored")
	resp, body = get(t, "/a")
	if body != "v1" || resp.Header.Get("Age") == "" {
		t.Fatalf("hit: %q, Age %q", body, resp.Header.Get("Age"))
	}
	wantStatus(t, resp, "hit")
	wantHits(t, o, 1)
}

package integration

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

// Edge cases found by trying Shield from outside: configurations and
// requests the issues did not spell out, each against a real Caddy.

// TestTwoShieldsInOneRoute: a second shield block of the same zone behind the
// first (one site, two directives) must not wait on the first one's flight.
func TestTwoShieldsInOneRoute(t *testing.T) {
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "max-age=60")
		io.WriteString(w, "once")
	})
	startCaddyfile(t, fmt.Sprintf(`http://localhost:9080 {
	route {
		shield {
			zone edges-nested
			max_wait 3s
		}
		shield {
			zone edges-nested
			max_wait 3s
		}
		reverse_proxy %s
	}
}`, o.hostPort()))
	resp, body := get(t, "/n")
	want(t, resp, body, 200, "once")
	wantStatus(t, resp, "fwd=uri-miss", "stored")
	resp, body = get(t, "/n")
	want(t, resp, body, 200, "once")
	wantStatus(t, resp, "shield; hit")
	wantHits(t, o, 1)
}

// TestGetWithBodyIsNotShared: a GET carrying a body reaches the origin with
// it, and its answer is neither stored nor given to anyone else.
func TestGetWithBodyIsNotShared(t *testing.T) {
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		w.Header().Set("Cache-Control", "max-age=60")
		fmt.Fprintf(w, "for %q", b)
	})
	startCaddy(t, "\t\tzone edges-body", o.hostPort())
	send := func(body string) (*http.Response, string) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, base+"/search", strings.NewReader(body))
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp, string(b)
	}
	resp, body := send("alice")
	want(t, resp, body, 200, `for "alice"`)
	wantStatus(t, resp, "detail=request-body")
	resp, body = send("bob")
	want(t, resp, body, 200, `for "bob"`)
	resp, body = get(t, "/search")
	want(t, resp, body, 200, `for ""`)
	wantStatus(t, resp, "fwd=uri-miss", "stored")
	wantHits(t, o, 3)
}

// TestAuthorizedRequestsDoNotHoldAnonymousOnes: while a fetch made for a
// request with credentials is in flight, an anonymous request for the same
// URL does not wait on it: it is fetched (and stored) on its own.
func TestAuthorizedRequestsDoNotHoldAnonymousOnes(t *testing.T) {
	release := make(chan struct{})
	var once sync.Once
	unblock := func() { once.Do(func() { close(release) }) }
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "" {
			<-release
			io.WriteString(w, "for the user")
			return
		}
		w.Header().Set("Cache-Control", "max-age=60")
		io.WriteString(w, "public")
	})
	t.Cleanup(unblock) // registered after the origin: runs before it closes, also when the test fails
	startCaddy(t, "\t\tzone edges-auth\n\t\tmax_wait 2s", o.hostPort())
	authDone := make(chan string, 1)
	go func() {
		_, body := get(t, "/doc", "Authorization", "Bearer x")
		authDone <- body
	}()
	// The authorized fetch has reached the origin once it counts one request.
	for o.hits.Load() < 1 {
		time.Sleep(time.Millisecond)
	}
	resp, body := get(t, "/doc")
	want(t, resp, body, 200, "public")
	wantStatus(t, resp, "fwd=uri-miss", "stored")
	unblock()
	if got := <-authDone; got != "for the user" {
		t.Fatalf("authorized client got %q", got)
	}
	resp, body = get(t, "/doc")
	want(t, resp, body, 200, "public")
	wantStatus(t, resp, "shield; hit")
	wantHits(t, o, 2)
}

// TestIgnoreSetsOriginAgeAside: with origin_cache_control ignore the rule's
// ttl counts from the fetch, whatever Age the origin sends.
func TestIgnoreSetsOriginAgeAside(t *testing.T) {
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "max-age=10")
		w.Header().Set("Age", "100")
		io.WriteString(w, "aged")
	})
	startCaddy(t, "\t\tzone edges-age\n\t\trule /* {\n\t\t\tttl 60s\n\t\t\torigin_cache_control ignore\n\t\t}", o.hostPort())
	get(t, "/a")
	resp, body := get(t, "/a")
	want(t, resp, body, 200, "aged")
	wantStatus(t, resp, "shield; hit")
	wantAge(t, resp, 0, 2)
	wantHits(t, o, 1)
}

// TestConditionalAndRangeEdges: an If-None-Match list over two field lines
// matches like one line; a Range of zero-length suffixes is unsatisfiable.
func TestConditionalAndRangeEdges(t *testing.T) {
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "max-age=60")
		w.Header().Set("ETag", `"v1"`)
		io.WriteString(w, "0123456789")
	})
	startCaddy(t, "\t\tzone edges-cond", o.hostPort())
	get(t, "/c")
	resp, _ := get(t, "/c", "If-None-Match", `"other"`, "If-None-Match", `"v1"`)
	if resp.StatusCode != http.StatusNotModified {
		t.Fatalf("If-None-Match over two lines: %d, want 304", resp.StatusCode)
	}
	resp, _ = get(t, "/c", "Range", "bytes=-0")
	if resp.StatusCode != http.StatusRequestedRangeNotSatisfiable || resp.Header.Get("Content-Range") != "bytes */10" {
		t.Fatalf("Range bytes=-0: %d, Content-Range %q; want 416, bytes */10", resp.StatusCode, resp.Header.Get("Content-Range"))
	}
	resp, body := get(t, "/c", "Range", "bytes=-3")
	if resp.StatusCode != http.StatusPartialContent || body != "789" {
		t.Fatalf("Range bytes=-3: %d %q, want 206 \"789\"", resp.StatusCode, body)
	}
	wantHits(t, o, 1)
}

// TestUpstreamFieldsForCaches: an upstream cache's Cache-Status stays, before
// Shield's; Surrogate-Control, meant for Shield, is not passed on.
func TestUpstreamFieldsForCaches(t *testing.T) {
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Status", "origin-cache; hit")
		w.Header().Set("Surrogate-Control", "max-age=60")
		io.WriteString(w, "x")
	})
	startCaddy(t, "\t\tzone edges-fields\n\t\trule /bypass/* {\n\t\t\tbypass\n\t\t}", o.hostPort())
	for _, wantPrefix := range []string{"origin-cache; hit, shield; fwd=uri-miss", "origin-cache; hit, shield; hit"} {
		resp, _ := get(t, "/f")
		if cs := resp.Header.Values("Cache-Status"); len(cs) != 1 || !strings.HasPrefix(cs[0], wantPrefix) {
			t.Fatalf("Cache-Status %q, want one line starting %q", cs, wantPrefix)
		}
		if v := resp.Header.Get("Surrogate-Control"); v != "" {
			t.Fatalf("Surrogate-Control %q passed on to the client", v)
		}
	}
	wantHits(t, o, 1)
}

// TestPurgeRequestEdges: a host without a port purges the host on every port;
// a purge request with more than one JSON value, or too large, is refused.
func TestPurgeRequestEdges(t *testing.T) {
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "max-age=60")
		io.WriteString(w, r.URL.Path)
	})
	startCaddy(t, "\t\tzone edges-purge", o.hostPort())
	get(t, "/p/1")
	if n := purge(t, `{"prefix": "/p/", "host": "other.example"}`); n != 0 {
		t.Fatalf("purge on another host took %d entries", n)
	}
	if n := purge(t, `{"prefix": "/p/", "host": "LOCALHOST"}`); n != 1 {
		t.Fatalf("purge by host without its port: %d entries, want 1", n)
	}
	if code, out := admin(t, http.MethodPost, "/shield/purge", `{"zone": "edges-purge"} {"zone": "x"}`); code != http.StatusBadRequest || !strings.Contains(out, "one JSON object") {
		t.Fatalf("two JSON objects: %d %s, want 400", code, out)
	}
	big := `{"tag": "` + strings.Repeat("x", 70<<10) + `"}`
	if code, out := admin(t, http.MethodPost, "/shield/purge", big); code != http.StatusRequestEntityTooLarge {
		t.Fatalf("a 70KiB purge request: %d %s, want 413", code, out)
	}
}

package integration

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

const adminURL = "http://localhost:2999"

// admin sends a request to Caddy's admin API and returns status and body.
func admin(t *testing.T, method, path, body string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, adminURL+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("admin %s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// purge posts a purge request and returns how many entries it affected.
func purge(t *testing.T, body string) int {
	t.Helper()
	code, out := admin(t, http.MethodPost, "/shield/purge", body)
	if code != http.StatusOK {
		t.Fatalf("purge %s: %d %s", body, code, out)
	}
	var res struct {
		Purged int `json:"purged"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("purge answer %q: %v", out, err)
	}
	return res.Purged
}

// versionedOrigin answers each path with its own version counter, tags
// /users/N with "user-N", and lets the origin be switched to failing.
func versionedOrigin(t *testing.T, failing *atomic.Bool) *origin {
	var version atomic.Int64
	return newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		if failing != nil && failing.Load() {
			w.WriteHeader(http.StatusInternalServerError)
			return
		}
		w.Header().Set("Cache-Control", "max-age=60, stale-while-revalidate=60, stale-if-error=600")
		if id, ok := strings.CutPrefix(r.URL.Path, "/users/"); ok {
			w.Header().Set("Surrogate-Key", "user-"+id+" users")
		}
		fmt.Fprintf(w, "%s v%d", r.URL.Path, version.Add(1))
	})
}

func TestPurgeByURLPrefixTagAndZone(t *testing.T) {
	o := versionedOrigin(t, nil)
	startCaddy(t, "\t\tzone purge-hard", o.hostPort())

	warm := func(paths ...string) {
		t.Helper()
		for _, p := range paths {
			get(t, p)
			resp, _ := get(t, p)
			wantStatus(t, resp, "hit")
			if resp.Header.Get("Surrogate-Key") != "" {
				t.Fatalf("%s: Surrogate-Key reached the client", p)
			}
		}
	}
	warm("/users/1", "/users/2", "/items/1?b=2&a=1")
	before := o.hits.Load()

	if n := purge(t, `{"url": "http://localhost:9080/items/1?a=1&b=2"}`); n != 1 {
		t.Fatalf("purge by url affected %d entries, want 1", n)
	}
	resp, body := get(t, "/items/1?b=2&a=1")
	wantStatus(t, resp, "fwd=uri-miss")
	if !strings.HasSuffix(body, fmt.Sprintf("v%d", before+1)) {
		t.Fatalf("after url purge got %q, want a new version", body)
	}

	if n := purge(t, `{"tag": "user-1"}`); n != 1 {
		t.Fatalf("purge by tag affected %d entries, want 1", n)
	}
	resp, _ = get(t, "/users/1")
	wantStatus(t, resp, "fwd=uri-miss")
	resp, _ = get(t, "/users/2")
	wantStatus(t, resp, "hit")

	if n := purge(t, `{"prefix": "/users/", "host": "localhost:9080"}`); n != 2 {
		t.Fatalf("purge by prefix affected %d entries, want 2", n)
	}
	if n := purge(t, `{"prefix": "/users/", "host": "other.example"}`); n != 0 {
		t.Fatalf("purge by prefix on another host affected %d entries, want 0", n)
	}
	resp, _ = get(t, "/users/2")
	wantStatus(t, resp, "fwd=uri-miss")

	warm("/items/1?b=2&a=1", "/users/1")
	if n := purge(t, `{"zone": "purge-hard"}`); n < 3 {
		t.Fatalf("purge of the zone affected %d entries, want at least 3", n)
	}
	resp, _ = get(t, "/users/1")
	wantStatus(t, resp, "fwd=uri-miss")
}

func TestSoftPurgeKeepsStaleProtection(t *testing.T) {
	var failing atomic.Bool
	o := versionedOrigin(t, &failing)
	startCaddy(t, "\t\tzone purge-soft", o.hostPort())
	get(t, "/users/7")
	_, v1 := get(t, "/users/7")

	if n := purge(t, `{"tag": "user-7", "soft": true}`); n != 1 {
		t.Fatalf("soft purge by tag affected %d entries, want 1", n)
	}
	// Soft-purged: stale now, so with the origin failing the copy still answers.
	failing.Store(true)
	resp, body := get(t, "/users/7")
	if resp.StatusCode != http.StatusOK || body != v1 {
		t.Fatalf("soft-purged entry with a failing origin: %d %q, want 200 %q", resp.StatusCode, body, v1)
	}
	wantStatus(t, resp, "fwd=stale")

	// A hard purge removes it: the failing origin's error passes through.
	if n := purge(t, `{"url": "http://localhost:9080/users/7"}`); n != 1 {
		t.Fatalf("hard purge affected %d entries, want 1", n)
	}
	resp, _ = get(t, "/users/7")
	if resp.StatusCode != http.StatusInternalServerError {
		t.Fatalf("after a hard purge with a failing origin: %d, want 500", resp.StatusCode)
	}
}

func TestPurgeRejectsBadRequests(t *testing.T) {
	o := versionedOrigin(t, nil)
	startCaddy(t, "\t\tzone purge-bad", o.hostPort())
	for _, tc := range []struct {
		method, body string
		code         int
	}{
		{http.MethodPost, `{`, 400},
		{http.MethodPost, `{}`, 400},
		{http.MethodPost, `{"url": "/relative"}`, 400},
		{http.MethodPost, `{"url": "http://h/a", "tag": "x"}`, 400},
		{http.MethodPost, `{"prefix": "users"}`, 400},
		{http.MethodPost, `{"host": "h"}`, 400},
		{http.MethodPost, `{"unknown": 1}`, 400},
		{http.MethodPost, `{"zone": "no-such-zone"}`, 404},
		{http.MethodGet, ``, 405},
	} {
		code, body := admin(t, tc.method, "/shield/purge", tc.body)
		if code != tc.code || !strings.Contains(body, `"error"`) {
			t.Errorf("%s %s: %d %s, want %d with a JSON error", tc.method, tc.body, code, body, tc.code)
		}
	}
}

func TestStats(t *testing.T) {
	o := versionedOrigin(t, nil)
	startCaddy(t, "\t\tzone stats-zone\n\t\torigin_rate 100/s\n\t\torigin_burst 50", o.hostPort())
	get(t, "/a")
	get(t, "/a")
	get(t, "/a")
	get(t, "/b")
	code, body := admin(t, http.MethodGet, "/shield/stats", "")
	if code != http.StatusOK {
		t.Fatalf("stats: %d %s", code, body)
	}
	var stats struct {
		Zones []struct {
			Name     string   `json:"name"`
			Entries  int      `json:"entries"`
			Hits     uint64   `json:"hits"`
			Misses   uint64   `json:"misses"`
			HitRatio float64  `json:"hit_ratio"`
			Tokens   *float64 `json:"budget_tokens"`
		} `json:"zones"`
	}
	if err := json.Unmarshal([]byte(body), &stats); err != nil {
		t.Fatalf("stats %q: %v", body, err)
	}
	for _, z := range stats.Zones {
		if z.Name != "stats-zone" {
			continue
		}
		if z.Entries != 2 || z.Hits != 2 || z.Misses != 2 || z.HitRatio != 0.5 {
			t.Fatalf("stats-zone = %+v, want 2 entries, 2 hits, 2 misses, ratio 0.5", z)
		}
		if z.Tokens == nil {
			t.Fatal("budget tokens missing")
		}
		if *z.Tokens > 50 || *z.Tokens < 40 {
			t.Fatalf("budget tokens = %v, want at most the burst of 50 and more than 40", *z.Tokens)
		}
		return
	}
	t.Fatalf("no stats-zone in %s", body)
}

// metricValue reads one sample from Caddy's /metrics, or -1 when absent.
func metricValue(t *testing.T, name string, labels ...string) float64 {
	t.Helper()
	_, body := admin(t, http.MethodGet, "/metrics", "")
	sc := bufio.NewScanner(strings.NewReader(body))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
next:
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		for _, l := range labels {
			if !strings.Contains(line, l) {
				continue next
			}
		}
		var v float64
		fields := strings.Fields(line)
		fmt.Sscan(fields[len(fields)-1], &v)
		return v
	}
	return -1
}

func TestMetricsAfterKnownSequence(t *testing.T) {
	o := versionedOrigin(t, nil)
	startCaddy(t, "\t\tzone metrics-zone\n\t\trule /pay/* {\n\t\t\tbypass\n\t\t}", o.hostPort())
	get(t, "/m1")    // miss
	get(t, "/m1")    // hit
	get(t, "/m1")    // hit
	get(t, "/m2")    // miss
	get(t, "/pay/1") // bypass
	zone := `zone="metrics-zone"`
	for _, c := range []struct {
		name, outcome string
		want          float64
	}{
		{"caddy_shield_requests_total", `outcome="hit"`, 2},
		{"caddy_shield_requests_total", `outcome="miss"`, 2},
		{"caddy_shield_requests_total", `outcome="bypass"`, 1},
		{"caddy_shield_origin_fetches_total", `reason="miss"`, 2},
	} {
		if got := metricValue(t, c.name, zone, c.outcome); got != c.want {
			t.Errorf("%s{%s,%s} = %v, want %v", c.name, zone, c.outcome, got, c.want)
		}
	}
	if got := metricValue(t, "caddy_shield_store_entries", zone); got != 2 {
		t.Errorf("caddy_shield_store_entries = %v, want 2", got)
	}
	if got := metricValue(t, "caddy_shield_origin_fetch_duration_seconds_count", zone); got != 2 {
		t.Errorf("origin fetch duration count = %v, want 2", got)
	}
}

func TestAccessLogAndPlaceholder(t *testing.T) {
	o := versionedOrigin(t, nil)
	logFile := filepath.Join(t.TempDir(), "access.log")
	startCaddyfile(t, fmt.Sprintf(`http://localhost:9080 {
	log {
		output file %s
		format json
	}
	header X-Shield-Outcome {http.shield.status} {
		defer
	}
	shield {
		zone log-zone
	}
	reverse_proxy %s
}`, logFile, o.hostPort()))
	resp, _ := get(t, "/logged")
	if got := resp.Header.Get("X-Shield-Outcome"); got != "miss" {
		t.Fatalf("placeholder on a miss = %q, want miss", got)
	}
	resp, _ = get(t, "/logged")
	if got := resp.Header.Get("X-Shield-Outcome"); got != "hit" {
		t.Fatalf("placeholder on a hit = %q, want hit", got)
	}
	// The log line is written after the response; poll until both are there.
	var outcomes []string
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		outcomes = readLogOutcomes(t, logFile)
		if len(outcomes) >= 2 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if strings.Join(outcomes, ",") != "miss,hit" {
		t.Fatalf("access log shield fields = %v, want [miss hit]", outcomes)
	}
}

func readLogOutcomes(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	var out []string
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		var entry struct {
			Shield string `json:"shield"`
		}
		if json.Unmarshal([]byte(line), &entry) == nil && entry.Shield != "" {
			out = append(out, entry.Shield)
		}
	}
	return out
}

func TestReloadKeepsHits(t *testing.T) {
	o := versionedOrigin(t, nil)
	startCaddy(t, "\t\tzone reload-zone\n\t\tmemory 64MiB\n\t\torigin_rate 100/s", o.hostPort())
	get(t, "/kept")
	resp, _ := get(t, "/kept")
	wantStatus(t, resp, "hit")

	// New rules and a new budget: the zone survives, the entry with it.
	startCaddy(t, "\t\tzone reload-zone\n\t\tmemory 64MiB\n\t\torigin_rate 10/s\n\t\trule /other/* {\n\t\t\tttl 5s\n\t\t}", o.hostPort())
	resp, _ = get(t, "/kept")
	wantStatus(t, resp, "hit")

	// A new size rebuilds the zone and copies its entries: still a hit.
	startCaddy(t, "\t\tzone reload-zone\n\t\tmemory 32MiB\n\t\torigin_rate 10/s", o.hostPort())
	resp, _ = get(t, "/kept")
	wantStatus(t, resp, "hit")
	wantHits(t, o, 1)
}

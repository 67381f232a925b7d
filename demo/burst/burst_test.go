package burst

import (
	"bytes"
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func msec(n int) time.Duration { return time.Duration(n) * time.Millisecond }

func TestPercentile(t *testing.T) {
	hundred := make([]time.Duration, 100)
	for i := range hundred {
		hundred[i] = msec(i + 1)
	}
	cases := []struct {
		name   string
		sorted []time.Duration
		p      float64
		want   time.Duration
	}{
		{"empty", nil, 99, 0},
		{"one value", []time.Duration{msec(7)}, 50, msec(7)},
		{"one value p99", []time.Duration{msec(7)}, 99, msec(7)},
		{"p50 of 100", hundred, 50, msec(50)},
		{"p99 of 100", hundred, 99, msec(99)},
		{"p100 of 100", hundred, 100, msec(100)},
		{"p7 of 100, no float drift", hundred, 7, msec(7)},
		{"tiny p is the minimum", hundred, 0.001, msec(1)},
		{"p50 of 4 is the 2nd", []time.Duration{1, 2, 3, 4}, 50, 2},
		{"p51 of 4 is the 3rd", []time.Duration{1, 2, 3, 4}, 51, 3},
		{"p99 of 10 is the max", []time.Duration{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, 99, 10},
	}
	for _, c := range cases {
		if got := Percentile(c.sorted, c.p); got != c.want {
			t.Errorf("%s: Percentile(p=%v) = %v, want %v", c.name, c.p, got, c.want)
		}
	}
}

func TestSummarize(t *testing.T) {
	iv := msec(100)
	samples := []sample{
		{done: msec(10), latency: msec(10), status: 200},
		{done: msec(50), latency: msec(50), status: 503},
		{done: msec(150), latency: msec(140), status: 200},
		{done: msec(160), latency: msec(30), status: 0},
		// nothing completes in [200ms, 300ms)
		{done: msec(305), latency: msec(300), status: 304},
	}
	// A reading a little late, one early, one tick missed (at 300ms) and the
	// final reading at the end of the run.
	counter := []counterSample{
		{at: msec(101), value: 4},
		{at: msec(199), value: 9},
		{at: msec(305), value: 12},
	}
	r := summarize(samples, counter, msec(305), iv)

	if r.Sent != 5 || r.Non2xx != 2 || r.Errors != 1 {
		t.Fatalf("counts = sent %d, non-2xx %d, errors %d", r.Sent, r.Non2xx, r.Errors)
	}
	if r.P50 != msec(50) || r.P99 != msec(300) {
		t.Fatalf("p50 %v p99 %v", r.P50, r.P99)
	}
	want := []Interval{
		{Start: 0, Requests: 2, P99: msec(50), OriginQueries: 4},
		{Start: msec(100), Requests: 2, P99: msec(140), OriginQueries: 5},
		// The missed tick's queries are spread by time: most fall before 300ms.
		{Start: msec(200), Requests: 0, P99: 0, OriginQueries: 3},
		{Start: msec(300), Requests: 1, P99: msec(300), OriginQueries: 0},
	}
	if fmt.Sprint(r.Intervals) != fmt.Sprint(want) {
		t.Fatalf("intervals\n got %v\nwant %v", r.Intervals, want)
	}
}

func TestCounterAt(t *testing.T) {
	readings := []counterSample{{msec(100), 10}, {msec(300), 30}, {msec(300), 30}, {msec(400), 31}}
	cases := []struct {
		at   time.Duration
		want int64
	}{
		{0, 0},
		{msec(50), 5},    // from zero at the start
		{msec(100), 10},  // on a reading
		{msec(200), 20},  // halfway between two
		{msec(300), 30},  // on a repeated reading
		{msec(350), 31},  // 30.5 rounds up
		{msec(1000), 31}, // past the last reading
	}
	for _, c := range cases {
		if got := counterAt(readings, c.at); got != c.want {
			t.Errorf("counterAt(%v) = %d, want %d", c.at, got, c.want)
		}
	}
	if got := counterAt(nil, msec(100)); got != 0 {
		t.Errorf("no readings: %d", got)
	}
}

func TestRun(t *testing.T) {
	const clients, requests, keys = 8, 80, 4
	var (
		mu       sync.Mutex
		paths    = map[string]int{}
		origin   atomic.Int64
		arrived  atomic.Int64
		allIn    = make(chan struct{})
		inFlight atomic.Int64
		peak     atomic.Int64
	)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := inFlight.Add(1)
		defer inFlight.Add(-1)
		for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
		}
		// The first `clients` requests wait for each other: this only
		// finishes if the burst really has them all in flight at once.
		if a := arrived.Add(1); a <= clients {
			if a == clients {
				close(allIn)
			}
			select {
			case <-allIn:
			case <-r.Context().Done():
				return
			}
		}
		origin.Add(1)
		mu.Lock()
		paths[r.URL.Path]++
		mu.Unlock()
		if r.URL.Path == "/items/4" {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		io.WriteString(w, "ok")
	}))
	defer srv.Close()

	r, err := Run(context.Background(), Options{
		Label:         "test",
		BaseURL:       srv.URL + "/",
		Clients:       clients,
		Requests:      requests,
		Keys:          keys,
		Path:          func(k int) string { return fmt.Sprintf("/items/%d", k) },
		Timeout:       30 * time.Second, // a guard against a hang, not a speed check
		OriginQueries: origin.Load,
	})
	if err != nil {
		t.Fatal(err)
	}
	if r.Label != "test" || r.Sent != requests || r.Errors != 0 {
		t.Fatalf("label %q, sent %d, errors %d", r.Label, r.Sent, r.Errors)
	}
	if r.Non2xx != requests/keys {
		t.Fatalf("non-2xx = %d, want %d (every request for key 4)", r.Non2xx, requests/keys)
	}
	if peak.Load() != clients {
		t.Fatalf("peak concurrency = %d, want %d", peak.Load(), clients)
	}
	for k := 1; k <= keys; k++ {
		if got := paths[fmt.Sprintf("/items/%d", k)]; got != requests/keys {
			t.Fatalf("key %d got %d requests, want %d", k, got, requests/keys)
		}
	}
	var completed int
	var queries int64
	for _, iv := range r.Intervals {
		completed += iv.Requests
		queries += iv.OriginQueries
	}
	if completed != requests || queries != requests {
		t.Fatalf("intervals add up to %d requests and %d origin queries, want %d each", completed, queries, requests)
	}
	if r.P50 <= 0 || r.P99 < r.P50 {
		t.Fatalf("p50 %v, p99 %v", r.P50, r.P99)
	}
}

func TestRunNoBaseURL(t *testing.T) {
	if _, err := Run(context.Background(), Options{}); err == nil {
		t.Fatal("want an error without a base url")
	}
}

func TestRunCanceled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := Run(ctx, Options{BaseURL: "http://127.0.0.1:1", Clients: 2, Requests: 4})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
}

func TestWriteSVGWellFormed(t *testing.T) {
	results := []Result{
		summarize([]sample{
			{done: msec(20), latency: msec(20), status: 200},
			{done: msec(250), latency: msec(240), status: 503},
		}, []counterSample{{msec(100), 8}, {msec(250), 8}}, msec(250), msec(100)),
		summarize([]sample{{done: msec(5), latency: msec(5), status: 200}},
			[]counterSample{{msec(5), 1}}, msec(5), msec(100)),
	}
	results[0].Label = `direct <API> & "friends"`
	results[1].Label = "caddy + shield"

	var buf bytes.Buffer
	if err := WriteSVG(&buf, results); err != nil {
		t.Fatal(err)
	}
	counts, texts := decodeSVG(t, buf.Bytes())
	if counts["polyline"] < 2 || counts["circle"] != 3 {
		t.Fatalf("elements = %v", counts)
	}
	joined := strings.Join(texts, "\n")
	for _, want := range []string{`direct <API> & "friends"`, "caddy + shield", "origin queries", "client p99 (ms)"} {
		if !strings.Contains(joined, want) {
			t.Fatalf("svg text lacks %q:\n%s", want, joined)
		}
	}
	// The empty middle interval of the first run breaks its line in two.
	if counts["polyline"] != 3 {
		t.Fatalf("polylines = %d, want 3", counts["polyline"])
	}
}

func TestWriteSVGNoResults(t *testing.T) {
	var buf bytes.Buffer
	if err := WriteSVG(&buf, nil); err != nil {
		t.Fatal(err)
	}
	decodeSVG(t, buf.Bytes())
	if strings.Contains(buf.String(), "NaN") || strings.Contains(buf.String(), "Inf") {
		t.Fatalf("svg has NaN or Inf:\n%s", buf.String())
	}
}

// decodeSVG checks that b is one well-formed <svg> element in the SVG
// namespace and returns its element counts and text.
func decodeSVG(t *testing.T, b []byte) (map[string]int, []string) {
	t.Helper()
	d := xml.NewDecoder(bytes.NewReader(b))
	counts := map[string]int{}
	var texts []string
	depth, roots := 0, 0
	for {
		tok, err := d.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("svg is not well-formed: %v\n%s", err, b)
		}
		switch tok := tok.(type) {
		case xml.StartElement:
			if depth == 0 {
				roots++
				if tok.Name.Local != "svg" || tok.Name.Space != "http://www.w3.org/2000/svg" {
					t.Fatalf("root = %v", tok.Name)
				}
			}
			depth++
			counts[tok.Name.Local]++
		case xml.EndElement:
			depth--
		case xml.CharData:
			if s := strings.TrimSpace(string(tok)); s != "" {
				texts = append(texts, s)
			}
		}
	}
	if roots != 1 || depth != 0 {
		t.Fatalf("roots %d, depth at end %d", roots, depth)
	}
	if bytes.Contains(b, []byte("NaN")) {
		t.Fatalf("svg has NaN:\n%s", b)
	}
	return counts, texts
}

func TestWriteTable(t *testing.T) {
	var buf bytes.Buffer
	err := WriteTable(&buf, []Result{{Label: "direct", Sent: 2000, OriginQueries: 420, OriginRejections: 1580, Non2xx: 1580, P50: msec(51), P99: 1500 * time.Microsecond}})
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("table:\n%s", buf.String())
	}
	for _, want := range []string{"direct", "2000", "420", "1580", "51.0 ms", "1.5 ms"} {
		if !strings.Contains(lines[1], want) {
			t.Fatalf("row %q lacks %q", lines[1], want)
		}
	}
}

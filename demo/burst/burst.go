// Package burst fires a burst of concurrent GETs at a server and measures
// what clients and the origin saw, for the demo's side-by-side comparison of
// an API on its own and the same API behind Caddy with Shield.
package burst

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Options describe one burst.
type Options struct {
	// Label names the run in tables and charts.
	Label string
	// BaseURL is the scheme and host the paths are appended to.
	BaseURL string
	// Clients is how many requests are in flight at once. Default 200.
	Clients int
	// Requests is how many requests the burst sends in all. Default 2000.
	Requests int
	// Keys is how many distinct hot keys the requests spread over. Default 20.
	Keys int
	// Path gives the path for a key in [1, Keys]. Default /users/{key}.
	Path func(key int) string
	// Interval is the width of a time bucket in Result.Intervals. Default 100ms.
	Interval time.Duration
	// Timeout bounds one request, so a stuck server cannot stall the burst.
	// Default 10s.
	Timeout time.Duration
	// OriginQueries, when set, reads the origin's running query count; it is
	// sampled every Interval to chart origin load over time.
	OriginQueries func() int64
}

func (o Options) withDefaults() Options {
	if o.Clients <= 0 {
		o.Clients = 200
	}
	if o.Requests <= 0 {
		o.Requests = 2000
	}
	if o.Keys <= 0 {
		o.Keys = 20
	}
	if o.Path == nil {
		o.Path = func(key int) string { return fmt.Sprintf("/users/%d", key) }
	}
	if o.Interval <= 0 {
		o.Interval = 100 * time.Millisecond
	}
	if o.Timeout <= 0 {
		o.Timeout = 10 * time.Second
	}
	return o
}

// Interval is one time bucket of a run.
type Interval struct {
	// Start is the bucket's start, from the start of the burst.
	Start time.Duration
	// Requests is how many requests completed in the bucket.
	Requests int
	// P99 is the 99th percentile latency of those requests; 0 when none.
	P99 time.Duration
	// OriginQueries is how many queries the origin ran in the bucket.
	OriginQueries int64
}

// Result is what one burst measured.
type Result struct {
	Label string
	// Sent is how many requests were sent.
	Sent int
	// Non2xx is how many got a response whose status is not 2xx.
	Non2xx int
	// Errors is how many got no response at all (refused, reset, timed out).
	Errors int
	// P50 and P99 are client latency percentiles over all requests, failed
	// ones included: a fast 503 is still what the client waited for.
	P50, P99 time.Duration
	// Elapsed is how long the burst took.
	Elapsed time.Duration
	// Interval is the bucket width of Intervals.
	Interval  time.Duration
	Intervals []Interval
	// OriginQueries and OriginRejections are the origin's totals for the run;
	// the caller fills them from the origin's own counters.
	OriginQueries, OriginRejections int64
}

// sample is one request's outcome.
type sample struct {
	done    time.Duration // completion, from the start of the burst
	latency time.Duration
	status  int // 0 when the request failed without a response
}

// counterSample is a reading of the origin's query counter.
type counterSample struct {
	at    time.Duration
	value int64
}

// Run fires the burst and waits for every request to finish. All clients
// start together, then each takes the next request number until none is left.
func Run(ctx context.Context, opts Options) (Result, error) {
	opts = opts.withDefaults()
	if opts.BaseURL == "" {
		return Result{}, errors.New("burst: no base url")
	}
	base := strings.TrimSuffix(opts.BaseURL, "/")

	// One idle connection per client, so the burst measures the servers and
	// not connection setup or ephemeral port churn.
	tr := &http.Transport{
		MaxIdleConns:        opts.Clients,
		MaxIdleConnsPerHost: opts.Clients,
		IdleConnTimeout:     30 * time.Second,
	}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: opts.Timeout}

	samples := make([]sample, opts.Requests)
	var next atomic.Int64
	startGate := make(chan struct{})
	var start time.Time
	var wg sync.WaitGroup
	for range opts.Clients {
		wg.Go(func() {
			<-startGate
			for {
				i := int(next.Add(1) - 1)
				if i >= opts.Requests || ctx.Err() != nil {
					return
				}
				url := base + opts.Path(i%opts.Keys+1)
				t0 := time.Now()
				status := get(ctx, client, url)
				end := time.Now()
				samples[i] = sample{done: end.Sub(start), latency: end.Sub(t0), status: status}
			}
		})
	}

	var counter []counterSample
	read := func() int64 { return 0 }
	if opts.OriginQueries != nil {
		read = opts.OriginQueries
	}
	origin0 := read()
	stopSampler := make(chan struct{})
	samplerDone := make(chan struct{})

	start = time.Now()
	close(startGate)
	go func() {
		defer close(samplerDone)
		t := time.NewTicker(opts.Interval)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				counter = append(counter, counterSample{time.Since(start), read() - origin0})
			case <-stopSampler:
				return
			}
		}
	}()
	wg.Wait()
	elapsed := time.Since(start)
	close(stopSampler)
	<-samplerDone
	counter = append(counter, counterSample{elapsed, read() - origin0})

	if err := ctx.Err(); err != nil {
		return Result{}, fmt.Errorf("burst %q: %w", opts.Label, err)
	}
	res := summarize(samples, counter, elapsed, opts.Interval)
	res.Label = opts.Label
	return res, nil
}

// get sends one GET and returns its status, or 0 when there was no response.
func get(ctx context.Context, client *http.Client, url string) int {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0
	}
	defer resp.Body.Close()
	// Read the whole body: latency is until the client has the response, and
	// a drained body lets the connection be reused.
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		return 0
	}
	return resp.StatusCode
}

// summarize turns raw samples into a Result. counter holds readings of the
// origin's query count since the start, about one per interval, the last one
// at elapsed.
func summarize(samples []sample, counter []counterSample, elapsed, interval time.Duration) Result {
	res := Result{Sent: len(samples), Elapsed: elapsed, Interval: interval}
	lat := make([]time.Duration, 0, len(samples))
	n := max(1, int(math.Ceil(float64(elapsed)/float64(interval))))
	perBucket := make([][]time.Duration, n)
	for _, s := range samples {
		switch {
		case s.status == 0:
			res.Errors++
		case s.status < 200 || s.status > 299:
			res.Non2xx++
		}
		lat = append(lat, s.latency)
		b := min(n-1, max(0, int(s.done/interval)))
		perBucket[b] = append(perBucket[b], s.latency)
	}
	slices.Sort(lat)
	res.P50 = Percentile(lat, 50)
	res.P99 = Percentile(lat, 99)

	res.Intervals = make([]Interval, n)
	var prev int64
	for k := range n {
		end := counterAt(counter, time.Duration(k+1)*interval)
		b := perBucket[k]
		slices.Sort(b)
		res.Intervals[k] = Interval{
			Start:         time.Duration(k) * interval,
			Requests:      len(b),
			P99:           Percentile(b, 99),
			OriginQueries: end - prev,
		}
		prev = end
	}
	return res
}

// counterAt estimates the origin's count at t by interpolating between the
// readings around it. The sampler can be late when the CPU is busy with the
// burst itself; interpolating spreads a late reading over the time it covers
// instead of piling it into one bucket. Past the last reading, the last value
// holds; before the first, the count grows from zero at the start.
func counterAt(readings []counterSample, t time.Duration) int64 {
	prev := counterSample{}
	for _, r := range readings {
		if r.at >= t {
			if r.at == prev.at {
				return r.value
			}
			frac := float64(t-prev.at) / float64(r.at-prev.at)
			return prev.value + int64(math.Round(frac*float64(r.value-prev.value)))
		}
		prev = r
	}
	return prev.value
}

// Percentile returns the p-th percentile (0 < p <= 100) of sorted by the
// nearest-rank method: the smallest value with at least p% of values at or
// below it. It returns 0 for no values.
func Percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	rank := int(math.Ceil(float64(len(sorted)) * p / 100))
	return sorted[min(len(sorted), max(1, rank))-1]
}

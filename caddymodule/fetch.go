package caddymodule

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

var (
	errOriginTimeout = errors.New("origin fetch timed out")
	errTooLarge      = errors.New("response larger than max_object_size")
	errWaitTimeout   = errors.New("waited max_wait for the origin")
	errTruncated     = errors.New("origin body shorter or longer than its Content-Length")
	errZoneClosed    = errors.New("cache zone closed")
)

// fetchJob describes one origin fetch made on behalf of whoever waits on its flight.
type fetchJob struct {
	next       caddyhttp.Handler
	req        *http.Request // the request that started the flight; cloned, never used as is
	owner      *http.Request // the client request the clone was made from: a private answer is its own
	primary    string
	key        string // the entry's key: primary or a variant key
	flightKey  string // the key its flight is known by (flightKey in serve.go); key when empty
	stale      *entry // the stored entry being revalidated, or nil
	pol        *policy
	maxObject  int64
	tagHeader  string
	background bool
	release    func() // budget already held (background refreshes)
}

// reason names the fetch for metrics.
func (j *fetchJob) reason() string {
	switch {
	case j.background:
		return "refresh"
	case j.stale != nil:
		return "revalidate"
	}
	return "miss"
}

// fetchResult is the immutable outcome of a fetch, shared by every waiter.
type fetchResult struct {
	err        error // no usable response (timeout, budget, origin error, too large)
	retryAfter time.Duration

	resp      *entry // the response (stored or not); its header is shared: clone before use
	stored    bool
	shareable bool   // may be given to waiters other than the one that started it
	reason    string // why not stored
	owner     *http.Request
	reqHeader http.Header // the request headers the fetch was made with (Vary matching)
	revalid   bool        // a 304 refreshed the stale entry
	status    int         // the origin's status (304 on revalidation)
	// cluster says how cluster mode took part: an L2 hit, an L2 marker, a degraded fetch (cluster_lock.go).
	cluster clusterNote
	// fallback is a stale copy from L2 for waiters that have none of their
	// own: answered within its stale-if-error window when the origin fails.
	fallback *entry
}

// failed reports whether the origin failed: an error or a 5xx answer.
func (r *fetchResult) failed() bool {
	return r.err != nil || r.status >= 500
}

// failureDetail names an origin failure for Cache-Status.
func (r *fetchResult) failureDetail() string {
	switch {
	case errors.Is(r.err, errOriginTimeout):
		return "origin-timeout"
	case errors.Is(r.err, errOriginBudget):
		return "origin-budget"
	case r.err != nil:
		return "origin-error"
	default:
		return "origin-status-" + strconv.Itoa(r.status)
	}
}

// runFlight performs the job's fetch detached from every client, stores what
// may be stored, then publishes the result. It never panics.
func (z *zone) runFlight(job fetchJob, f *flight) {
	res := z.fetch(job, f)
	if res.err == nil {
		z.settle(job, res)
	} else if errors.Is(res.err, errTooLarge) {
		// Not storable: later requests stream straight from the origin
		// instead of each costing a capture attempt and then a pass-through.
		z.hints.set(job.primary, time.Now().Add(job.pol.uncacheableHint))
	}
	if job.background {
		if res.failed() {
			z.backoff.failed(job.key, time.Now())
		} else {
			z.backoff.succeeded(job.key)
		}
	}
	z.flights.finish(cmp.Or(job.flightKey, job.key), f, res)
	z.clusterFinish(job, f, res) // cluster mode (cluster_lock.go): share through L2, release the fleet lock
}

// fetch asks the origin once: budget first (unless already held), then the
// request on a private writer with its own deadline.
func (z *zone) fetch(job fetchJob, f *flight) (res *fetchResult) {
	res = &fetchResult{owner: job.owner, reqHeader: job.req.Header}
	// Cluster mode (cluster_lock.go): L2 and the fleet lock first, then the fleet budget into job.release.
	if z.clusterBeforeFetch(&job, f, res) {
		return res
	}
	release := job.release
	if release == nil {
		ctx, cancel := context.WithTimeout(z.ctx, job.pol.maxWait)
		f.mu.Lock()
		f.abandon = cancel
		nobody := f.waiters <= 0
		f.mu.Unlock()
		if nobody {
			cancel()
		}
		var err error
		waitStart := time.Now()
		release, res.retryAfter, err = z.budget.acquire(ctx)
		cancel()
		z.metrics.wait.Observe(time.Since(waitStart).Seconds())
		if err != nil {
			z.metrics.rejected.Inc()
			res.err = err
			return res
		}
	}
	f.markStarted()
	defer release()
	fetchStart := time.Now()
	defer func() { z.metrics.fetch(job.reason(), time.Since(fetchStart)) }()

	ctx, cancel := context.WithTimeout(context.WithoutCancel(job.req.Context()), job.pol.originTimeout)
	defer cancel()
	stop := context.AfterFunc(z.ctx, cancel)
	defer stop()

	cw := &captureWriter{header: make(http.Header), limit: job.maxObject}
	out := originRequest(ctx, job.req, cw)
	reqTime := time.Now()
	done := make(chan error, 1)
	go func() {
		defer func() {
			if v := recover(); v != nil {
				if v == http.ErrAbortHandler {
					done <- errors.New("origin response aborted")
				} else {
					done <- fmt.Errorf("panic in origin fetch: %v", v)
				}
			}
		}()
		done <- job.next.ServeHTTP(cw, out)
	}()
	var err error
	select {
	case err = <-done:
	case <-ctx.Done():
		// Abandon the handler: it sees the cancelled context and returns on its own.
		if z.ctx.Err() != nil {
			res.err = errZoneClosed
		} else {
			res.err = errOriginTimeout
		}
		return res
	}
	respTime := time.Now()
	switch {
	case cw.tooLarge:
		res.err = errTooLarge
		return res
	case ctx.Err() != nil:
		res.err = errOriginTimeout
		return res
	case err != nil:
		var he caddyhttp.HandlerError
		if errors.As(err, &he) && errors.Is(he.Err, context.DeadlineExceeded) {
			res.err = errOriginTimeout
		} else {
			res.err = fmt.Errorf("origin fetch: %w", err)
		}
		return res
	}
	status := cw.status
	if status == 0 {
		status = http.StatusOK
	}
	if cl := cw.header.Get("Content-Length"); cl != "" && status != http.StatusNotModified {
		if n, perr := strconv.ParseInt(cl, 10, 64); perr != nil || n != int64(cw.buf.Len()) {
			res.err = errTruncated
			return res
		}
	}
	res.status = status
	res.resp = &entry{
		status:        status,
		header:        cw.header,
		body:          cw.buf.Bytes(),
		responseTime:  respTime,
		fetchDuration: respTime.Sub(reqTime),
	}
	res.resp.initialAge = initialAge(cw.header, reqTime, respTime)
	if status == http.StatusNotModified && job.stale != nil {
		res.revalid = true
		res.resp = refreshed(job.stale, cw.header, reqTime, respTime)
	}
	return res
}

// settle decides whether the response may be stored and shared, and stores it.
func (z *zone) settle(job fetchJob, res *fetchResult) {
	if res.cluster.fromL2() {
		return // cluster mode (cluster_lock.go): nothing was fetched; an L2 hit is already in L1
	}
	e := res.resp
	if res.status >= 500 && job.stale != nil {
		// RFC 5861: a failing origin never replaces a good copy.
		res.reason = "origin-error"
		res.shareable = true
		return
	}
	dec := decide(job.pol, job.req.Header, e.status, e.header, e.responseTime.Add(-e.fetchDuration), e.responseTime)
	if res.revalid && !job.pol.ignoreOrigin {
		// The refreshed entry takes the 304's age; only the policy is recomputed.
		dec.initialAge = e.initialAge
	}
	res.reason = dec.reason
	switch dec.reason {
	case "", "status", "no-freshness":
		res.shareable = true
	}
	if !dec.storable {
		if dec.reason == "authorization" || dec.reason == "request-no-store" {
			// This request's own reason, not the URL's: other clients' requests
			// stay cacheable and the stored copy stays.
			return
		}
		if res.status < 500 {
			z.hints.set(job.primary, time.Now().Add(job.pol.uncacheableHint))
		}
		if job.stale != nil && res.status < 500 {
			z.store.remove(job.key) // the origin no longer lets this be stored
		}
		return
	}
	e.initialAge, e.lifetime, e.swr, e.sie = dec.initialAge, dec.lifetime, dec.swr, dec.sie
	e.noCache, e.mustRevalidate, e.softPurged = dec.noCache, dec.mustRevalidate, false
	e.header = storableHeader(e.header, job.tagHeader, &e.tags)
	if e.header.Get("Content-Length") == "" && e.status != http.StatusNoContent {
		// Stored once, so that hits need not format it.
		e.header.Set("Content-Length", strconv.Itoa(len(e.body)))
	}
	var err error
	if res.revalid {
		err = z.store.putAt(job.key, e)
	} else {
		err = z.store.put(job.primary, job.req.Header, e)
	}
	if err != nil {
		z.log().Warn("entry not stored", zap.String("zone", z.shape.name), zap.Error(err))
		return
	}
	z.hints.clear(job.primary)
	res.stored = true
	if ce := z.log().Check(zapcore.DebugLevel, "stored"); ce != nil {
		ce.Write(zap.String("zone", z.shape.name), zap.Int("status", e.status),
			zap.Duration("lifetime", e.lifetime), zap.Int("bytes", len(e.body)))
	}
}

// refreshed merges a 304's header fields into the stale entry (RFC 9111 §4.3.4).
func refreshed(stale *entry, h http.Header, reqTime, respTime time.Time) *entry {
	e := *stale
	merged := make(http.Header, len(stale.header)+len(h))
	for k, v := range stale.header {
		merged[k] = v
	}
	for k, v := range h {
		switch k {
		case "Content-Length", "Content-Encoding", "Transfer-Encoding", "Content-Range",
			// The stored response's own validator and digest describe the stored body.
			"Etag", "Content-Md5":
			continue
		}
		merged[k] = v
	}
	e.header = merged
	e.responseTime = respTime
	e.fetchDuration = respTime.Sub(reqTime)
	e.initialAge = initialAge(h, reqTime, respTime)
	e.softPurged = false
	return &e
}

// hopByHop are the fields RFC 9110 §7.6.1 reserves to one connection; Age is recomputed on use.
var hopByHop = []string{"Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authenticate",
	"Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade", "Age"}

// storableHeader drops what must not be stored and pulls out surrogate keys,
// which are never sent to clients.
func storableHeader(h http.Header, tagHeader string, tags *[]string) http.Header {
	out := h.Clone()
	for _, f := range headerTokens(h.Values("Connection")) {
		out.Del(f)
	}
	for _, k := range hopByHop {
		out.Del(k)
	}
	if tagHeader != "" {
		for _, v := range out.Values(tagHeader) {
			*tags = append(*tags, strings.Fields(v)...)
		}
		out.Del(tagHeader)
	}
	return out
}

// originRequest gives the job's detached clone its own context, replacer and
// vars, so that the fetch shares no mutable state with any client's request.
func originRequest(ctx context.Context, job *http.Request, w http.ResponseWriter) *http.Request {
	out := job.WithContext(ctx)
	if srv, ok := job.Context().Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server); ok {
		out = caddyhttp.PrepareRequest(out, caddy.NewReplacer(), w, srv)
	}
	return out
}

// captureWriter is the private writer an origin fetch writes to: its own header
// map, a body buffer capped at the zone's max object size, 1xx answers ignored.
type captureWriter struct {
	header      http.Header
	status      int
	buf         bytes.Buffer
	limit       int64
	tooLarge    bool
	wroteHeader bool
}

func (c *captureWriter) Header() http.Header { return c.header }

func (c *captureWriter) WriteHeader(code int) {
	if c.wroteHeader || (code >= 100 && code < 200) {
		return
	}
	c.status, c.wroteHeader = code, true
	if cl := c.header.Get("Content-Length"); cl != "" {
		if n, err := strconv.ParseInt(cl, 10, 64); err == nil && n > c.limit {
			c.tooLarge = true
		}
	}
}

func (c *captureWriter) Write(p []byte) (int, error) {
	if !c.wroteHeader {
		c.WriteHeader(http.StatusOK)
	}
	if c.tooLarge || int64(c.buf.Len()+len(p)) > c.limit {
		c.tooLarge = true
		return 0, errTooLarge
	}
	return c.buf.Write(p)
}

// Flush is a no-op: the response is delivered once complete.
func (c *captureWriter) Flush() {}

var _ http.Flusher = (*captureWriter)(nil)

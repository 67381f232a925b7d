package caddymodule

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// ServeHTTP answers GET and HEAD from the zone when it can, forwards through
// one coalesced, budgeted origin fetch when it must, and invalidates on unsafe methods.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	if r.Context().Value(fetchingZoneKey{}) == h.zone {
		// A second shield of the same zone behind the one fetching this request
		// (two blocks in one route): joining its own flight would wait forever.
		return next.ServeHTTP(w, r)
	}
	switch r.Method {
	case http.MethodGet, http.MethodHead:
	case http.MethodOptions, http.MethodTrace, http.MethodConnect:
		h.outcome(w, r, "method", "shield; fwd=method") // RFC 9211: the method is never served from cache
		return next.ServeHTTP(w, r)
	default:
		h.outcome(w, r, "method", "shield; fwd=method")
		return h.serveUnsafe(w, r, next)
	}
	pol := h.policyFor(r)
	if pol.bypass || r.Header.Get("Upgrade") != "" {
		h.outcome(w, r, "bypass", "shield; fwd=bypass")
		return next.ServeHTTP(w, r)
	}
	if hasBody(r) {
		// A GET body has no defined meaning (RFC 9110 §9.3.1), but an API may
		// read it: the answer may depend on it, so it is neither shared nor stored.
		return h.passThrough(w, r, next, pol, "uncacheable", "shield; fwd=request; detail=request-body")
	}

	now := time.Now()
	z := h.zone
	primary := requestKey(r)
	e, key := z.store.lookup(primary, r.Header)
	cc := h.clientDirectives(r, pol)

	if e == nil {
		if cc.onlyIfCached {
			h.outcome(w, r, "miss", "shield; fwd=miss; detail=only-if-cached")
			return caddyhttp.Error(http.StatusGatewayTimeout, errors.New("only-if-cached and not stored"))
		}
		if z.hints.active(primary, now) {
			return h.passThrough(w, r, next, pol, "uncacheable", "shield; fwd=uri-miss; detail=uncacheable")
		}
		if r.Header.Get("Range") != "" {
			// A range of something not stored: let the origin answer it as asked.
			return h.passThrough(w, r, next, pol, "miss", "shield; fwd=uri-miss; detail=range")
		}
		fwd := "uri-miss"
		if key != primary {
			fwd = "vary-miss"
		}
		return h.fetchAndServe(w, r, next, pol, primary, key, nil, fwd)
	}

	freshFor := e.freshFor(now)
	forced := false // the client asked to skip the stored copy (client_cache_control honor)
	if pol.honorClient {
		forced = cc.noCache ||
			(cc.maxAge >= 0 && e.age(now) > cc.maxAge) ||
			(freshFor > 0 && cc.minFresh >= 0 && freshFor < cc.minFresh)
	}
	switch {
	case forced:
	case freshFor > 0:
		h.maybeRefreshEarly(r, next, pol, primary, key, e, freshFor)
		return h.writeEntry(w, r, e, false, true, now, "hit", hitStatus(freshFor))
	case cc.maxStale >= 0 && !e.mustRevalidate && !e.noCache && e.staleness(now) <= cc.maxStale:
		return h.writeEntry(w, r, e, false, true, now, "stale", staleStatus(freshFor, "", "max-stale"))
	case e.withinStaleWindow(now, e.swr):
		h.refreshInBackground(r, next, pol, primary, key, e)
		return h.writeEntry(w, r, e, false, true, now, "stale", staleStatus(freshFor, "", "stale-while-revalidate"))
	}
	if cc.onlyIfCached {
		h.outcome(w, r, "miss", "shield; fwd=miss; detail=only-if-cached")
		return caddyhttp.Error(http.StatusGatewayTimeout, errors.New("only-if-cached and stored copy stale"))
	}
	fwd := "stale"
	if forced {
		fwd = "request"
	}
	return h.fetchAndServe(w, r, next, pol, primary, key, e, fwd)
}

// fetchAndServe answers through the key's flight: it joins the running fetch
// or starts one, waits within the client's limits, and serves what came back,
// or the stale copy when the origin failed or the budget is spent.
func (h *Handler) fetchAndServe(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler,
	pol *policy, primary, key string, stale *entry, fwd string) error {
	z := h.zone
	for attempt := 0; ; attempt++ {
		now := time.Now()
		canStale := stale != nil && stale.withinStaleWindow(now, stale.sie)
		fk := flightKey(r, key)
		if canStale && !z.budget.available() && !z.flights.running(fk) {
			// RFC 5861 §4 applied to overload: a spent budget is an origin that cannot answer now.
			return h.writeEntry(w, r, stale, false, true, now, "stale", staleStatus(stale.freshFor(now), "", "origin-budget"))
		}
		f, created := z.flights.join(fk)
		collapsed := !created
		if created {
			if fresh, _ := z.store.lookup(primary, r.Header); fresh != nil && fresh.freshFor(now) > 0 &&
				(stale == nil || fresh.responseTime.After(stale.responseTime)) {
				// A flight that ended between our lookup and our join stored it already.
				// Waiters that joined meanwhile share the entry: copy its header, as they do.
				z.flights.finish(fk, f, &fetchResult{resp: fresh, stored: true, shareable: true, status: fresh.status, reqHeader: r.Header})
				return h.writeEntry(w, r, fresh, true, true, now, "hit", hitStatus(fresh.freshFor(now)))
			}
			job := h.newJob(r, next, pol, primary, key, stale)
			job.flightKey = fk
			go z.runFlight(job, f)
		}
		res, err := f.wait(r.Context(), pol.maxWait)
		now = time.Now()
		if err != nil {
			if errors.Is(err, errWaitTimeout) {
				f.mu.Lock()
				started := f.started
				f.mu.Unlock()
				// The client waited max_wait: for the budget (503), or for a
				// fetch still in flight (504; it completes and is stored).
				detail, code := "max-wait", http.StatusGatewayTimeout
				if !started {
					detail, code = "origin-budget", http.StatusServiceUnavailable
				}
				if canStale {
					return h.writeEntry(w, r, stale, false, true, now, "stale", staleStatus(stale.freshFor(now), "", detail))
				}
				return h.reject(w, r, code, detail, z.budget.retryAfter(), err)
			}
			return caddyhttp.Error(499, err) // the client went away
		}
		if stale == nil && res.fallback != nil {
			stale = res.fallback // cluster mode: L2's stale copy
			canStale = stale.withinStaleWindow(now, stale.sie)
		}
		if res.failed() {
			if canStale && stale.withinStaleWindow(now, stale.sie) {
				return h.writeEntry(w, r, stale, false, true, now, "stale",
					staleStatus(stale.freshFor(now), fwdStatus(res.status), res.failureDetail()))
			}
			switch {
			case errors.Is(res.err, errOriginBudget):
				return h.reject(w, r, http.StatusServiceUnavailable, "origin-budget", res.retryAfter, res.err)
			case errors.Is(res.err, errTooLarge):
				return h.passThrough(w, r, next, pol, "miss", "shield; fwd="+fwd+"; detail=too-large")
			case errors.Is(res.err, errOriginTimeout):
				return h.reject(w, r, http.StatusGatewayTimeout, "origin-timeout", 0, res.err)
			case res.err != nil:
				return h.reject(w, r, http.StatusBadGateway, "origin-error", 0, res.err)
			}
			// A 5xx answer: pass it on, as the origin said it.
		}
		if !res.shareable && res.owner != r {
			// Meant for the client whose request made it: this one asks on its own.
			return h.passThrough(w, r, next, pol, "miss", "shield; fwd="+fwd+"; detail="+res.reason)
		}
		if collapsed && !sameVariant(res, r) {
			if attempt < 2 {
				stale = nil
				if e, k := z.store.lookup(primary, r.Header); e == nil {
					key, fwd = k, "vary-miss"
					continue
				} else if e.freshFor(now) > 0 {
					return h.writeEntry(w, r, e, false, true, now, "hit", hitStatus(e.freshFor(now)))
				}
			}
			return h.passThrough(w, r, next, pol, "miss", "shield; fwd=vary-miss")
		}
		if res.cluster == clusterL2Stale {
			// Cluster mode: another instance's copy, stale within its window.
			h.refreshInBackground(r, next, pol, primary, key, res.resp)
			return h.writeEntry(w, r, res.resp, true, true, now, "stale", staleStatus(res.resp.freshFor(now), "", "stale-while-revalidate"))
		}
		return h.writeResult(w, r, res, fwd, collapsed, now)
	}
}

// newJob describes the fetch for a flight. The request is cloned now, detached
// from the client, so that the fetch may outlive it.
func (h *Handler) newJob(r *http.Request, next caddyhttp.Handler, pol *policy, primary, key string, stale *entry) fetchJob {
	out := r.Clone(context.WithValue(context.WithoutCancel(r.Context()), fetchingZoneKey{}, h.zone))
	out.Method = http.MethodGet
	out.Body, out.ContentLength = http.NoBody, 0 // never read a client's body after it left
	out.Header.Del("Content-Length")
	out.Header.Del("Transfer-Encoding")
	out.Header.Add("Surrogate-Capability", surrogateCapability)
	for _, k := range conditionalHeaders {
		out.Header.Del(k)
	}
	if stale != nil {
		setValidators(out.Header, stale)
	}
	return fetchJob{
		next: next, req: out, owner: r, primary: primary, key: key, stale: stale, pol: pol,
		maxObject: h.MaxObjectSize, tagHeader: h.tagHeader,
	}
}

// flightKey is the coalescing key of a request for the entry key: requests
// with credentials wait only on one another, since what their fetch gets is
// shared with anonymous clients only when the origin says so (RFC 9111 §3.5),
// and anonymous clients must not queue behind it to find that out.
func flightKey(r *http.Request, key string) string {
	if _, ok := r.Header["Authorization"]; ok {
		return key + "\x00authorization"
	}
	return key
}

// hasBody says whether a request carries a body.
func hasBody(r *http.Request) bool {
	return r.ContentLength > 0 || (r.ContentLength < 0 && r.Body != nil && r.Body != http.NoBody)
}

// setValidators makes a fetch conditional on the stored entry's validators.
func setValidators(h http.Header, stale *entry) {
	if etag := stale.header.Get("ETag"); etag != "" {
		h.Set("If-None-Match", etag)
	}
	if lm := stale.header.Get("Last-Modified"); lm != "" {
		h.Set("If-Modified-Since", lm)
	}
}

// fetchingZoneKey marks the requests a zone's fetches send down the chain.
type fetchingZoneKey struct{}

// conditionalHeaders are answered by Shield from the full stored response.
var conditionalHeaders = []string{"If-None-Match", "If-Modified-Since", "If-Match", "If-Unmodified-Since", "If-Range", "Range"}

// sameVariant says whether a coalesced client may take the fetched response:
// it must ask for the same variant as the request the fetch was made for.
func sameVariant(res *fetchResult, r *http.Request) bool {
	if res.resp == nil {
		return true
	}
	for _, name := range varyNames(res.resp.header) {
		if normalizeVaryValue(res.reqHeader.Values(name)) != normalizeVaryValue(r.Header.Values(name)) {
			return false
		}
	}
	return true
}

// refreshInBackground starts one refresh of a key, only when the budget has a
// token and a slot free now (with a reserve kept for misses), no fetch for it
// is running, and its last refresh did not just fail.
func (h *Handler) refreshInBackground(r *http.Request, next caddyhttp.Handler, pol *policy, primary, key string, e *entry) {
	z := h.zone
	if !z.backoff.allowed(key, time.Now()) || z.flights.running(key) {
		return
	}
	release, ok := z.budget.tryBackground()
	if !ok {
		return
	}
	f, ok := z.flights.startBackground(key)
	if !ok {
		release()
		return
	}
	job := h.newJob(r, next, pol, primary, key, e)
	job.background, job.release = true, release
	if ce := z.log().Check(zapcore.DebugLevel, "background refresh"); ce != nil {
		ce.Write(zap.String("zone", z.shape.name), zap.String("rule", pol.name), zap.Duration("age", e.age(time.Now())))
	}
	go z.runFlight(job, f)
}

// maybeRefreshEarly refreshes a hot entry shortly before it expires, with a
// probability that grows through the last tenth of its lifetime, so entries
// stored together (after a deploy or a purge) do not all expire together.
func (h *Handler) maybeRefreshEarly(r *http.Request, next caddyhttp.Handler, pol *policy, primary, key string, e *entry, freshFor time.Duration) {
	window := e.lifetime / 10
	if window <= 0 || freshFor >= window {
		return
	}
	if rand.Float64() < 1-float64(freshFor)/float64(window) {
		h.refreshInBackground(r, next, pol, primary, key, e)
	}
}

// passThrough sends the client's own request to the origin, within the budget,
// streaming the answer; nothing is stored.
func (h *Handler) passThrough(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, pol *policy, outcome, status string) error {
	z := h.zone
	ctx, cancel := context.WithTimeout(r.Context(), pol.maxWait)
	waitStart := time.Now()
	release, retryAfter, err := z.budget.acquire(ctx)
	cancel()
	z.metrics.wait.Observe(time.Since(waitStart).Seconds())
	if err != nil {
		z.metrics.rejected.Inc()
		return h.reject(w, r, http.StatusServiceUnavailable, "origin-budget", retryAfter, err)
	}
	defer release()
	z.metrics.fetch("pass", 0)
	h.outcome(w, r, outcome, status)
	return next.ServeHTTP(h.hideTags(w), r)
}

// serveUnsafe forwards an unsafe method outside the budget and, when it
// succeeds, invalidates the stored entries it may have changed (RFC 9111 §4.4).
func (h *Handler) serveUnsafe(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	rec := caddyhttp.NewResponseRecorder(w, nil, nil)
	err := next.ServeHTTP(rec, r)
	status := rec.Status()
	if status == 0 && err == nil {
		status = http.StatusOK
	}
	if err != nil || status < 200 || status >= 400 {
		return err
	}
	h.invalidate(requestKey(r))
	hdr := rec.Header()
	for _, field := range []string{"Location", "Content-Location"} {
		v := hdr.Get(field)
		if v == "" {
			continue
		}
		u, perr := r.URL.Parse(v)
		if perr != nil {
			continue
		}
		if u.Host == "" {
			u.Host = r.Host
		}
		if sameOrigin(u, r) { // a response cannot invalidate another host's entries
			h.invalidate(urlKey(u))
		}
	}
	return nil
}

func (h *Handler) invalidate(primary string) {
	z := h.zone
	z.store.remove(primary)
	z.hints.clear(primary)
	z.clusterInvalidate(primary) // cluster mode (cluster_purge.go): in L2 and on the other instances too
	if ce := z.log().Check(zapcore.DebugLevel, "invalidated"); ce != nil {
		ce.Write(zap.String("zone", z.shape.name))
	}
}

// writeEntry answers from an entry: stored headers, Age, Cache-Status, then a
// 304 for a matching conditional request, a range, or the body (none for HEAD).
// shared says the entry's header is shared with other requests and must be copied.
func (h *Handler) writeEntry(w http.ResponseWriter, r *http.Request, e *entry, shared, withAge bool, now time.Time, outcome, status string) error {
	hdr := w.Header()
	for k, v := range e.header {
		if k == "Surrogate-Control" {
			continue // for surrogates like Shield, not for clients (Edge Architecture 1.0)
		}
		if shared {
			v = slices.Clone(v)
		}
		hdr[k] = v
	}
	if h.tagHeader != "" && len(e.tags) == 0 {
		hdr.Del(h.tagHeader)
	}
	if withAge {
		if shared {
			hdr["Age"] = []string{ageSeconds(e.age(now))}
		} else {
			// The entry was decoded for this request alone: its spare room is ours.
			hdr["Age"] = e.spareValue(0, ageSeconds(e.age(now)))
		}
	}
	h.outcome(w, r, outcome, status)
	if upstream := e.header["Cache-Status"]; len(upstream) > 0 {
		// Caches nearer the origin keep their entries, listed first (RFC 9211 §2).
		hdr["Cache-Status"] = []string{strings.Join(upstream, ", ") + ", " + status}
	}
	if e.status == http.StatusOK && notModified(r, e) {
		hdr.Del("Content-Length")
		w.WriteHeader(http.StatusNotModified)
		return nil
	}
	if e.status == http.StatusOK && r.Method == http.MethodGet && r.Header.Get("Range") != "" {
		if zeroSuffixRange(r.Header.Get("Range")) {
			// bytes=-0 selects nothing (RFC 9110 §14.1.3), which ServeContent answers with a 206.
			hdr.Del("Content-Length")
			hdr.Set("Content-Range", "bytes */"+strconv.Itoa(len(e.body)))
			w.WriteHeader(http.StatusRequestedRangeNotSatisfiable)
			return nil
		}
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(e.body))
		return nil
	}
	if hdr.Get("Content-Length") == "" && e.status != http.StatusNoContent && e.status != http.StatusNotModified {
		hdr.Set("Content-Length", strconv.Itoa(len(e.body)))
	}
	w.WriteHeader(e.status)
	if r.Method != http.MethodHead && len(e.body) > 0 {
		_, _ = w.Write(e.body) // a failed write means the client left: nothing to report
	}
	return nil
}

// writeResult answers a waiter from a fetch result. In cluster mode an L2
// hit is a hit (detail=l2-hit), and a fetch made while Redis was unreachable
// says so (detail=cluster-degraded).
func (h *Handler) writeResult(w http.ResponseWriter, r *http.Request, res *fetchResult, fwd string, collapsed bool, now time.Time) error {
	if res.cluster == clusterL2Hit {
		return h.writeEntry(w, r, res.resp, true, true, now, "hit", hitStatus(res.resp.freshFor(now))+"; detail=l2-hit")
	}
	var detail string
	switch {
	case !res.stored && res.reason != "" && (!collapsed || res.cluster != clusterNone):
		detail = res.reason
	case res.cluster == clusterDegraded:
		detail = "cluster-degraded"
	case collapsed:
		detail = "coalesced"
	}
	var b strings.Builder
	b.WriteString("shield; fwd=")
	b.WriteString(fwd)
	b.WriteString("; fwd-status=")
	b.WriteString(strconv.Itoa(res.status))
	if res.stored {
		b.WriteString("; stored")
	}
	outcome := "miss"
	if collapsed {
		b.WriteString("; collapsed")
		outcome = "coalesced"
	}
	if detail != "" {
		b.WriteString("; detail=")
		b.WriteString(detail)
	}
	return h.writeEntry(w, r, res.resp, true, res.stored, now, outcome, b.String())
}

// reject answers with an error status, and Retry-After when the wait is known.
func (h *Handler) reject(w http.ResponseWriter, r *http.Request, code int, detail string, retryAfter time.Duration, err error) error {
	if retryAfter > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(int((retryAfter+time.Second-1)/time.Second)))
	}
	h.outcome(w, r, "rejected", "shield; fwd=uri-miss; detail="+detail)
	if ce := h.logger.Check(zapcore.DebugLevel, "rejected"); ce != nil {
		ce.Write(zap.String("zone", h.zone.shape.name), zap.Int("status", code), zap.Error(err))
	}
	return caddyhttp.Error(code, err)
}

// notModified evaluates a client's conditional GET or HEAD against an entry
// (RFC 9110 §13.2.2: If-None-Match first, If-Modified-Since only without it).
func notModified(r *http.Request, e *entry) bool {
	if inm := r.Header.Values("If-None-Match"); len(inm) > 0 {
		etag := e.header.Get("ETag")
		if etag == "" {
			return false
		}
		for _, line := range inm { // a list may span field lines (RFC 9110 §5.3)
			for cand := range strings.SplitSeq(line, ",") {
				cand = strings.TrimSpace(cand)
				if cand == "*" || weakMatch(cand, etag) {
					return true
				}
			}
		}
		return false
	}
	ims, ok := parseHTTPDate(r.Header.Get("If-Modified-Since"))
	if !ok {
		return false
	}
	lm, ok := parseHTTPDate(e.header.Get("Last-Modified"))
	if !ok {
		if lm, ok = parseHTTPDate(e.header.Get("Date")); !ok {
			lm = e.responseTime
		}
	}
	return !lm.After(ims)
}

// zeroSuffixRange says whether a Range asks only for zero-length suffixes,
// which no representation can satisfy.
func zeroSuffixRange(v string) bool {
	spec, ok := strings.CutPrefix(strings.TrimSpace(v), "bytes=")
	if !ok {
		return false
	}
	for r := range strings.SplitSeq(spec, ",") {
		if n, ok := strings.CutPrefix(strings.TrimSpace(r), "-"); !ok || strings.Trim(n, "0") != "" || n == "" {
			return false
		}
	}
	return true
}

func weakMatch(a, b string) bool {
	return strings.TrimPrefix(a, "W/") == strings.TrimPrefix(b, "W/")
}

// clientDirectives are the request's Cache-Control directives when the policy
// honours them; under the default (ignore) a client cannot force an origin fetch.
func (h *Handler) clientDirectives(r *http.Request, pol *policy) cacheControl {
	if !pol.honorClient {
		return noDirectives
	}
	values := r.Header.Values("Cache-Control")
	if len(values) == 0 {
		if strings.Contains(strings.ToLower(r.Header.Get("Pragma")), "no-cache") {
			cc := noDirectives
			cc.noCache = true // RFC 9111 §5.4: Pragma only without Cache-Control
			return cc
		}
		return noDirectives
	}
	return parseCacheControl(values)
}

var noDirectives = parseCacheControl(nil)

// hideTags keeps surrogate keys from reaching clients on streamed answers.
func (h *Handler) hideTags(w http.ResponseWriter) http.ResponseWriter {
	if h.tagHeader == "" {
		return w
	}
	return &tagHidingWriter{ResponseWriterWrapper: &caddyhttp.ResponseWriterWrapper{ResponseWriter: w}, field: h.tagHeader}
}

type tagHidingWriter struct {
	*caddyhttp.ResponseWriterWrapper
	field string
}

func (t *tagHidingWriter) WriteHeader(code int) {
	t.fixHeader()
	t.ResponseWriter.WriteHeader(code)
}

func (t *tagHidingWriter) Write(p []byte) (int, error) {
	t.fixHeader()
	return t.ResponseWriter.Write(p)
}

// fixHeader drops the tags and puts Shield's Cache-Status, set before the
// origin's answer was copied in, after the upstream caches' (RFC 9211 §2).
func (t *tagHidingWriter) fixHeader() {
	hdr := t.ResponseWriter.Header()
	hdr.Del(t.field)
	delete(hdr, "Surrogate-Control")
	if cs := hdr["Cache-Status"]; len(cs) > 1 && strings.HasPrefix(cs[0], "shield;") {
		hdr["Cache-Status"] = []string{strings.Join(cs[1:], ", ") + ", " + cs[0]}
	}
}

func hitStatus(freshFor time.Duration) string {
	secs := int64(freshFor / time.Second)
	if secs >= 0 && secs < int64(len(hitStatuses)) {
		return hitStatuses[secs]
	}
	return "shield; hit; ttl=" + strconv.FormatInt(secs, 10)
}

// hitStatuses are the Cache-Status values of hits with less than an hour of
// freshness left, made once so that a hit allocates no header value.
var hitStatuses = func() []string {
	s := make([]string, 3600)
	for i := range s {
		s[i] = "shield; hit; ttl=" + strconv.Itoa(i)
	}
	return s
}()

func staleStatus(freshFor time.Duration, fwdStatus, detail string) string {
	s := "shield; fwd=stale" + fwdStatus + "; ttl=" + strconv.FormatInt(int64(freshFor/time.Second), 10)
	if detail != "" {
		s += "; detail=" + detail
	}
	return s
}

func fwdStatus(status int) string {
	if status == 0 {
		return ""
	}
	return "; fwd-status=" + strconv.Itoa(status)
}

// sameOrigin reports whether u names the request's own host.
func sameOrigin(u *url.URL, r *http.Request) bool { return strings.EqualFold(u.Host, r.Host) }

package caddymodule

import (
	"net/http"
	"strconv"
	"strings"
	"time"
)

// heuristicCap bounds the Last-Modified heuristic (RFC 9111 §4.2.2), so an old
// document is not kept for weeks on a guess.
const heuristicCap = 24 * time.Hour

// policy is a route's resolved caching rules (the rule's options over the block's defaults).
type policy struct {
	name            string // the rule's label in logs; "default" for the block defaults
	ttl             time.Duration
	swr             time.Duration
	sie             time.Duration
	bypass          bool
	ignoreOrigin    bool // origin_cache_control ignore: the rule's ttl and stale windows win
	honorClient     bool // client_cache_control honor
	maxWait         time.Duration
	originTimeout   time.Duration
	uncacheableHint time.Duration
}

// understoodStatus lists the status codes RFC 9110 defines.
func understoodStatus(status int) bool {
	switch {
	case status >= 200 && status <= 206, status >= 300 && status <= 308 && status != 306,
		status >= 400 && status <= 417, status == 421, status == 422, status == 426,
		status >= 500 && status <= 505:
		return true
	}
	return false
}

// decision says whether and how long a response may be stored and served.
type decision struct {
	storable bool
	reason   string // why not storable (for Cache-Status detail and logs)

	initialAge     time.Duration // RFC 9111 §4.2.3 corrected_initial_age
	lifetime       time.Duration // freshness lifetime
	swr            time.Duration // stale-while-revalidate window past the lifetime
	sie            time.Duration // stale-if-error window past the lifetime
	noCache        bool          // revalidate before every use
	mustRevalidate bool          // never serve stale
}

// heuristicallyCacheable lists the statuses RFC 9110 §15.1 makes cacheable by default.
func heuristicallyCacheable(status int) bool {
	switch status {
	case 200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501:
		return true
	}
	return false
}

// decide applies RFC 9111 §3 (storing) and §4.2 (freshness) to a response,
// with the route's policy filling in what the origin leaves unsaid.
// reqTime and respTime bracket the origin exchange.
func decide(p *policy, reqHeader http.Header, status int, h http.Header, reqTime, respTime time.Time) decision {
	var d decision
	cc := parseCacheControl(h.Values("Cache-Control"))
	d.initialAge = initialAge(h, reqTime, respTime)
	if p.ignoreOrigin {
		// The rule's ttl counts from the fetch: the origin's Age and Date are
		// its own caching information, which ignore sets aside.
		d.initialAge = max(respTime.Sub(reqTime), 0)
	}

	sc := parseSurrogateControl(h.Values("Surrogate-Control"), surrogateDevice)
	if p.ignoreOrigin {
		sc = surrogateControl{maxAge: -1}
	}
	switch {
	case status < 200 || status == http.StatusPartialContent || status == http.StatusNotModified:
		return d.not("status")
	case cc.mustUnderstand && !understoodStatus(status):
		// RFC 9111 §5.2.2.3: only store a status code the cache understands.
		return d.not("must-understand")
	case sc.noStore:
		return d.not("surrogate-no-store")
	case cc.noStore && sc.maxAge < 0 && !(cc.mustUnderstand && understoodStatus(status)):
		// A surrogate max-age is the origin telling this cache to store;
		// must-understand with a known status overrides no-store too.
		return d.not("no-store")
	case cc.private:
		return d.not("private")
	case len(h.Values("Set-Cookie")) > 0:
		return d.not("set-cookie")
	case p.honorClient && parseCacheControl(reqHeader.Values("Cache-Control")).noStore:
		return d.not("request-no-store")
	}
	// RFC 9111 §3.5: a response to an authenticated request is shared only when it says so.
	if reqHeader.Get("Authorization") != "" && !cc.public && cc.sMaxAge < 0 && !cc.mustRevalidate {
		return d.not("authorization")
	}
	for _, v := range headerTokens(h.Values("Vary")) {
		if v == "*" {
			return d.not("vary-star")
		}
	}

	explicit, hasExplicit := explicitLifetime(cc, h, respTime)
	if sc.maxAge >= 0 {
		// Surrogate-Control speaks to surrogates like Shield and wins over Cache-Control.
		explicit, hasExplicit = sc.maxAge, true
	}
	heuristic := heuristicallyCacheable(status)
	switch {
	case p.ignoreOrigin && p.ttl > 0 && heuristic:
		d.lifetime = p.ttl
	case hasExplicit:
		d.lifetime = explicit
	case !heuristic && !cc.public:
		return d.not("status")
	case p.ttl > 0:
		d.lifetime = p.ttl
	default:
		d.lifetime = lastModifiedHeuristic(h, respTime)
	}

	d.swr = pickWindow(p.ignoreOrigin, p.swr, cc.staleWhileRevalidate)
	d.sie = pickWindow(p.ignoreOrigin, p.sie, cc.staleIfError)
	if !p.ignoreOrigin {
		// s-maxage carries proxy-revalidate's meaning for shared caches (RFC 9111 §5.2.2.10).
		d.mustRevalidate = cc.mustRevalidate || cc.proxyRevalidate || cc.sMaxAge >= 0
		d.noCache = cc.noCache
		if d.noCache {
			d.lifetime = 0
		}
		if d.mustRevalidate || d.noCache {
			d.swr, d.sie = 0, 0
		}
	}
	hasValidator := h.Get("ETag") != "" || h.Get("Last-Modified") != ""
	if d.lifetime <= 0 && !hasValidator && d.swr <= 0 && d.sie <= 0 {
		return d.not("no-freshness")
	}
	d.storable = true
	return d
}

func (d decision) not(reason string) decision {
	d.storable = false
	d.reason = reason
	return d
}

// pickWindow chooses between a rule's stale window and the origin's (RFC 5861).
func pickWindow(ignoreOrigin bool, rule, origin time.Duration) time.Duration {
	if origin >= 0 && !(ignoreOrigin && rule > 0) {
		return origin
	}
	return rule
}

// explicitLifetime is the origin's own freshness (RFC 9111 §4.2.1):
// s-maxage, then max-age, then Expires minus Date.
func explicitLifetime(cc cacheControl, h http.Header, respTime time.Time) (time.Duration, bool) {
	switch {
	case cc.conflicting:
		return 0, true
	case cc.sMaxAge >= 0:
		return cc.sMaxAge, true
	case cc.maxAge >= 0:
		return cc.maxAge, true
	}
	expires := h.Values("Expires")
	if len(expires) == 0 {
		return 0, false
	}
	exp, ok := parseHTTPDate(expires[0])
	if !ok {
		return 0, true // RFC 9111 §5.3: an invalid Expires means already expired
	}
	date := dateOr(h, respTime)
	return max(exp.Sub(date), 0), true
}

// lastModifiedHeuristic gives 10% of the time since Last-Modified (RFC 9111 §4.2.2).
func lastModifiedHeuristic(h http.Header, respTime time.Time) time.Duration {
	lm, ok := parseHTTPDate(h.Get("Last-Modified"))
	if !ok {
		return 0
	}
	since := dateOr(h, respTime).Sub(lm)
	if since <= 0 {
		return 0
	}
	return min(since/10, heuristicCap)
}

func dateOr(h http.Header, fallback time.Time) time.Time {
	if d, ok := parseHTTPDate(h.Get("Date")); ok {
		return d
	}
	return fallback
}

// initialAge computes corrected_initial_age (RFC 9111 §4.2.3).
func initialAge(h http.Header, reqTime, respTime time.Time) time.Duration {
	ageValue, ok := parseAge(h.Values("Age"))
	if !ok {
		// An Age that cannot be read cannot vouch for freshness: treat the response as stale.
		return maxDelta
	}
	apparent := time.Duration(0)
	if date, ok := parseHTTPDate(h.Get("Date")); ok {
		apparent = max(respTime.Sub(date), 0)
	}
	corrected := ageValue + max(respTime.Sub(reqTime), 0)
	return max(apparent, corrected)
}

// parseAge reads the Age field. Age is a singleton: of a list on one line the
// first member counts (RFC 9111 §5.1); several field lines, or a value that is
// not a non-negative integer, make it unreadable.
func parseAge(values []string) (time.Duration, bool) {
	switch len(values) {
	case 0:
		return 0, true
	case 1:
	default:
		return 0, false
	}
	first, _, _ := strings.Cut(values[0], ",")
	return parseDelta(strings.TrimSpace(first))
}

// ageSeconds formats an age for the Age header: whole seconds, never negative.
func ageSeconds(age time.Duration) string {
	if age < 0 {
		age = 0
	}
	return strconv.FormatInt(int64(age/time.Second), 10)
}

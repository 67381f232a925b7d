// Package caddymodule is Shield: a Caddy HTTP handler that caches the GET and
// HEAD responses of the handlers after it (usually reverse_proxy) to protect
// the origin: per-route freshness, coalesced misses, stale serving and an
// origin fetch budget.
package caddymodule

import (
	"context"
	"fmt"
	"math"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

func init() {
	caddy.RegisterModule(Handler{})
}

// Defaults for the block's options.
const (
	defaultMemory          = 128 << 20
	defaultMaxObjectSize   = 1 << 20
	defaultZone            = "default"
	defaultTagHeader       = "Surrogate-Key"
	defaultMaxWait         = 5 * time.Second
	defaultOriginTimeout   = 30 * time.Second
	defaultUncacheableHint = 30 * time.Second
)

// Handler caches GET and HEAD responses from the handlers after it.
type Handler struct {
	// Zone names the cache this block uses. Blocks naming the same zone share
	// its memory and origin budget. Default: "default".
	Zone string `json:"zone,omitempty"`
	// Memory bounds the zone's store, in bytes. Default: 128MiB.
	Memory int64 `json:"memory,omitempty"`
	// MaxObjectSize is the largest response body stored, in bytes; larger ones
	// stream to the client uncached. Default: 1MiB.
	MaxObjectSize int64 `json:"max_object_size,omitempty"`
	// OriginRate is the token-bucket refill of the zone's origin fetches, as
	// "<n>/<s|m|h>" (e.g. "50/s"). Default: unlimited.
	OriginRate string `json:"origin_rate,omitempty"`
	// OriginBurst is the bucket's size. Default: one second of OriginRate.
	OriginBurst int `json:"origin_burst,omitempty"`
	// OriginConcurrency bounds the zone's origin fetches in flight. Default: unlimited.
	OriginConcurrency int `json:"origin_concurrency,omitempty"`
	// TagHeader is the response header carrying space-separated surrogate keys
	// (for purge by tag); it is removed before responses reach clients.
	// Default: Surrogate-Key.
	TagHeader string `json:"tag_header,omitempty"`
	// Cluster is "on" or "off": whether the zone joins the cluster of the
	// `shield` global option (shared L2, fleet-wide coalescing and budget,
	// purges). Default: on when a cluster is configured.
	Cluster string `json:"cluster,omitempty"`

	// The block's rule options: the defaults of every rule and the policy of
	// paths no rule matches.
	RuleOptions

	// Rules are tried in order; the first whose path matches applies.
	Rules []Rule `json:"rules,omitempty"`

	src       *srcPositions // where the Caddyfile set the options (nil from JSON)
	logger    *zap.Logger
	zone      *zone
	zoneKey   string // set once the zone was acquired; Cleanup releases only this
	tagHeader string
	defaults  policy
	rules     []compiledRule
}

// RuleOptions are the options a rule sets; unset ones come from the block.
type RuleOptions struct {
	// TTL is the freshness lifetime when the origin gives none (with
	// origin_cache_control honor) or always (with ignore). Default: 0.
	TTL *caddy.Duration `json:"ttl,omitempty"`
	// StaleWhileRevalidate serves a stale entry at once for this long past its
	// lifetime while one background fetch refreshes it. Default: 0.
	StaleWhileRevalidate *caddy.Duration `json:"stale_while_revalidate,omitempty"`
	// StaleIfError serves a stale entry for this long past its lifetime when
	// the origin fails or the origin budget is spent. Default: 0.
	StaleIfError *caddy.Duration `json:"stale_if_error,omitempty"`
	// Bypass never caches the route (payments, permissions).
	Bypass *bool `json:"bypass,omitempty"`
	// OriginCacheControl is "honor" (default) or "ignore": with ignore the
	// rule's ttl and stale windows win over the origin's freshness directives.
	// no-store, private, Set-Cookie and Authorization always forbid storing.
	OriginCacheControl string `json:"origin_cache_control,omitempty"`
	// ClientCacheControl is "ignore" (default) or "honor": with ignore a client's
	// no-cache or max-age=0 cannot force an origin fetch.
	ClientCacheControl string `json:"client_cache_control,omitempty"`
	// MaxWait is the longest a client waits for a shared fetch or for the
	// origin budget. Default: 5s.
	MaxWait *caddy.Duration `json:"max_wait,omitempty"`
	// OriginTimeout bounds one origin fetch, whoever waits for it. Default: 30s.
	OriginTimeout *caddy.Duration `json:"origin_timeout,omitempty"`
}

// Rule applies options to the requests whose path matches.
type Rule struct {
	// Path patterns, with Caddy's path matcher syntax (/users/*, *.json, /exact).
	Path caddyhttp.MatchPath `json:"path"`
	RuleOptions
}

type compiledRule struct {
	match caddyhttp.MatchPath
	pol   policy
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.shield",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision resolves the rules and acquires the zone, last, so that a failing
// Provision leaves nothing to release.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	if h.Zone == "" {
		h.Zone = defaultZone
	}
	if h.Memory == 0 {
		h.Memory = defaultMemory
	}
	if h.MaxObjectSize == 0 {
		h.MaxObjectSize = defaultMaxObjectSize
	}
	h.tagHeader = http.CanonicalHeaderKey(h.TagHeader)
	if h.TagHeader == "" {
		h.tagHeader = defaultTagHeader
	}
	if err := checkTagHeader(h.tagHeader); err != nil {
		return err
	}
	declared, err := h.declaredBudget()
	if err != nil {
		return err
	}
	if h.Memory < 0 || h.MaxObjectSize < 0 {
		return fmt.Errorf("memory and max_object_size cannot be negative")
	}

	base := policy{
		name: "default", maxWait: defaultMaxWait, originTimeout: defaultOriginTimeout,
		uncacheableHint: defaultUncacheableHint,
	}
	if h.defaults, err = base.with(h.RuleOptions); err != nil {
		return fmt.Errorf("block options: %w", err)
	}
	h.rules = nil
	for i, rule := range h.Rules {
		if len(rule.Path) == 0 {
			return fmt.Errorf("rule %d: no path pattern", i)
		}
		for _, pattern := range rule.Path {
			if err := checkPathPattern(pattern); err != nil {
				return fmt.Errorf("rule %d: %w", i, err)
			}
		}
		if err := rule.Path.Provision(ctx); err != nil {
			return fmt.Errorf("rule %d: %w", i, err)
		}
		pol, err := h.defaults.with(rule.RuleOptions)
		if err != nil {
			return fmt.Errorf("rule %s: %w", strings.Join(rule.Path, " "), err)
		}
		pol.name = strings.Join(rule.Path, " ")
		h.rules = append(h.rules, compiledRule{match: rule.Path, pol: pol})
	}

	if err := registerMetrics(ctx); err != nil {
		return fmt.Errorf("registering metrics: %w", err)
	}
	shape := zoneShape{name: h.Zone, memory: h.Memory, maxObject: h.MaxObjectSize}
	effective, err := claimZone(ctx, shape, declared)
	if err != nil {
		return err
	}
	key := shape.poolKey()
	previous := zoneNamed(shape.name, key) // looked up first: the pool is locked while constructing
	val, _, err := zones.LoadOrNew(key, func() (caddy.Destructor, error) {
		z, err := newZone(shape, h.logger)
		if err == nil && previous != nil {
			z.inherit(previous)
		}
		return z, err
	})
	if err != nil {
		return fmt.Errorf("creating zone %q: %w", h.Zone, err)
	}
	h.zone, h.zoneKey = val.(*zone), key
	h.zone.logger.Store(h.logger)
	h.zone.budget.configure(effective.perSecond, effective.burst, effective.concurrency)
	return h.provisionCluster(ctx) // cluster mode (cluster.go): join or leave the fleet
}

// with overlays a rule's options on p and checks them.
func (p policy) with(o RuleOptions) (policy, error) {
	set := func(dst *time.Duration, d *caddy.Duration, name string) error {
		if d == nil {
			return nil
		}
		if *d < 0 {
			return fmt.Errorf("%s cannot be negative", name)
		}
		*dst = time.Duration(*d)
		return nil
	}
	for _, f := range []struct {
		dst  *time.Duration
		val  *caddy.Duration
		name string
	}{
		{&p.ttl, o.TTL, "ttl"}, {&p.swr, o.StaleWhileRevalidate, "stale_while_revalidate"},
		{&p.sie, o.StaleIfError, "stale_if_error"}, {&p.maxWait, o.MaxWait, "max_wait"},
		{&p.originTimeout, o.OriginTimeout, "origin_timeout"},
	} {
		if err := set(f.dst, f.val, f.name); err != nil {
			return p, err
		}
	}
	if o.Bypass != nil {
		p.bypass = *o.Bypass
	}
	if p.bypass && o.TTL != nil {
		// Also when the rule inherits bypass from the block: its ttl would be ignored.
		return p, fmt.Errorf("ttl on a bypass rule")
	}
	switch o.OriginCacheControl {
	case "":
	case "honor":
		p.ignoreOrigin = false
	case "ignore":
		p.ignoreOrigin = true
	default:
		return p, fmt.Errorf("origin_cache_control must be honor or ignore, not %q", o.OriginCacheControl)
	}
	switch o.ClientCacheControl {
	case "":
	case "honor":
		p.honorClient = true
	case "ignore":
		p.honorClient = false
	default:
		return p, fmt.Errorf("client_cache_control must be honor or ignore, not %q", o.ClientCacheControl)
	}
	if p.maxWait <= 0 {
		return p, fmt.Errorf("max_wait must be positive")
	}
	if p.originTimeout <= 0 {
		return p, fmt.Errorf("origin_timeout must be positive")
	}
	return p, nil
}

// parseRate reads "<n>/<s|m|h>" into fetches per second; "" is unlimited.
func parseRate(s string) (float64, error) {
	if s == "" {
		return 0, nil
	}
	num, unit, ok := strings.Cut(s, "/")
	if !ok || !plainNumber(num) {
		return 0, fmt.Errorf("invalid origin_rate %q: want <n>/<s|m|h>, e.g. 50/s", s)
	}
	n, err := strconv.ParseFloat(num, 64)
	if err != nil || n <= 0 || math.IsInf(n, 0) {
		return 0, fmt.Errorf("invalid origin_rate %q: want a positive number of fetches, e.g. 50/s", s)
	}
	switch unit {
	case "s":
	case "m":
		n /= 60
	case "h":
		n /= 3600
	default:
		return 0, fmt.Errorf("invalid origin_rate %q: unit must be s, m or h", s)
	}
	if n < 1.0/3600 {
		return 0, fmt.Errorf("invalid origin_rate %q: at least 1/h (omit origin_rate for no limit)", s)
	}
	return n, nil
}

// checkTagHeader refuses header fields that mean something else: the tag
// header is removed from every response, so naming one of these would strip
// cookies, caching directives or the body's framing from what clients get.
func checkTagHeader(field string) error {
	switch {
	case strings.HasPrefix(field, "Content-"), strings.HasPrefix(field, "Access-Control-"):
	case !slices.Contains(reservedHeaders, field):
		return nil
	}
	return fmt.Errorf("tag_header %s: a header with its own meaning; use one of your own, such as Surrogate-Key", field)
}

// reservedHeaders are fields, in canonical form, that tag_header may not name.
var reservedHeaders = []string{
	"Accept-Ranges", "Age", "Allow", "Alt-Svc", "Authorization", "Cache-Control", "Cache-Status",
	"Cdn-Cache-Control", "Connection", "Date", "Etag", "Expires", "Keep-Alive", "Last-Modified", "Link",
	"Location", "Pragma", "Proxy-Authenticate", "Retry-After", "Server", "Set-Cookie", "Strict-Transport-Security",
	"Surrogate-Control", "Trailer", "Transfer-Encoding", "Upgrade", "Vary", "Via", "Www-Authenticate",
}

// checkPathPattern refuses a path pattern that can never match: request paths
// start with a slash, so a pattern must start with / or * (Caddy's path matcher).
func checkPathPattern(pattern string) error {
	if pattern == "" || (pattern[0] != '/' && pattern[0] != '*') {
		return fmt.Errorf("path pattern %q never matches: it must start with / or *", pattern)
	}
	return nil
}

// plainNumber accepts decimal digits with an optional fraction: no sign,
// exponent, hex or inf, which strconv.ParseFloat would also take.
func plainNumber(s string) bool {
	digits, frac, _ := strings.Cut(s, ".")
	if digits == "" {
		return false
	}
	for _, part := range []string{digits, frac} {
		for _, c := range part {
			if c < '0' || c > '9' {
				return false
			}
		}
	}
	return true
}

// Validate is a no-op: Provision checks everything it resolves.
func (h *Handler) Validate() error { return nil }

// Cleanup releases the zone; the last config to let go of it destroys it.
func (h *Handler) Cleanup() error {
	if h.zoneKey == "" {
		return nil
	}
	_, err := zones.Delete(h.zoneKey)
	h.zoneKey = ""
	return err
}

// policyFor returns the first matching rule's policy, or the block's defaults.
func (h *Handler) policyFor(r *http.Request) *policy {
	for i := range h.rules {
		if h.rules[i].match.Match(r) {
			return &h.rules[i].pol
		}
	}
	return &h.defaults
}

// outcome tells what happened: the Cache-Status header, the
// {http.shield.status} placeholder and the access log's shield field.
func (h *Handler) outcome(w http.ResponseWriter, r *http.Request, outcome, status string) {
	w.Header()["Cache-Status"] = []string{status}
	h.zone.counts.add(outcome)
	h.zone.metrics.request(outcome, statusReason(status))
	if repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); ok {
		repl.Set("http.shield.status", boxedOutcome(outcome))
	}
	if extra, ok := r.Context().Value(caddyhttp.ExtraLogFieldsCtxKey).(*caddyhttp.ExtraLogFields); ok {
		extra.Set(zap.String("shield", outcome))
	}
}

// boxedOutcomes holds the outcome words already converted to interface
// values, so that setting the placeholder allocates nothing on the hit path.
var boxedOutcomes = func() map[string]any {
	m := map[string]any{}
	for _, o := range []string{"hit", "miss", "stale", "coalesced", "bypass", "uncacheable", "rejected", "method"} {
		m[o] = o
	}
	return m
}()

func boxedOutcome(outcome string) any {
	if v, ok := boxedOutcomes[outcome]; ok {
		return v
	}
	return outcome
}

// budgetShape is a zone's origin budget as one block declares it.
type budgetShape struct {
	perSecond   float64
	burst       int
	concurrency int
}

// claims records, per config load, the zones its blocks declared, so that two
// blocks of one config cannot give one zone two sizes or two budgets. A config
// is identified by its metrics registry, which Caddy makes anew for each load.
var (
	claimsMu sync.Mutex
	claims   = map[any]map[string]zoneClaim{}
)

type zoneClaim struct {
	shape  zoneShape
	budget budgetShape
}

// declaredBudget is the origin budget the block declares (zero when none):
// origin_rate in fetches a second, origin_burst defaulting to one second of it.
func (h *Handler) declaredBudget() (budgetShape, error) {
	perSecond, err := parseRate(h.OriginRate)
	if err != nil {
		return budgetShape{}, err
	}
	if h.OriginBurst < 0 || h.OriginConcurrency < 0 {
		return budgetShape{}, fmt.Errorf("origin_burst and origin_concurrency cannot be negative")
	}
	burst := h.OriginBurst
	if burst == 0 && perSecond > 0 {
		burst = max(1, int(math.Ceil(perSecond)))
	}
	return budgetShape{perSecond, burst, h.OriginConcurrency}, nil
}

// join is the zone as two blocks declare it: the same sizes, and the budget
// one of them declares (blocks that declare none share it).
func (c zoneClaim) join(next zoneClaim) (zoneClaim, error) {
	if c.shape != next.shape {
		return c, fmt.Errorf("zone %q is declared twice with different sizes (memory %d and %d, max_object_size %d and %d)",
			next.shape.name, c.shape.memory, next.shape.memory, c.shape.maxObject, next.shape.maxObject)
	}
	switch {
	case next.budget == (budgetShape{}) || next.budget == c.budget:
		return c, nil
	case c.budget == (budgetShape{}):
		return next, nil
	}
	return c, fmt.Errorf("zone %q is declared twice with different origin budgets (origin_rate, origin_burst, origin_concurrency)", next.shape.name)
}

// claimZone records a block's zone and returns the budget the config gives it:
// the one a block declares (blocks that declare none share it).
func claimZone(ctx caddy.Context, shape zoneShape, b budgetShape) (budgetShape, error) {
	id := any(ctx.GetMetricsRegistry())
	claimsMu.Lock()
	defer claimsMu.Unlock()
	m, ok := claims[id]
	if !ok {
		m = map[string]zoneClaim{}
		claims[id] = m
		// The config's context ends when the config is unloaded.
		context.AfterFunc(ctx, func() {
			claimsMu.Lock()
			delete(claims, id)
			claimsMu.Unlock()
		})
	}
	cur := zoneClaim{shape, b}
	if prev, ok := m[shape.name]; ok {
		var err error
		if cur, err = prev.join(cur); err != nil {
			return b, err
		}
	}
	m[shape.name] = cur
	return cur.budget, nil
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)

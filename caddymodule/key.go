package caddymodule

import (
	"net/http"
	"net/url"
	"slices"
	"strings"
)

// cacheKey derives an entry's primary key from host, path and query, with the
// query's parameters sorted by name so ?a=1&b=2 and ?b=2&a=1 share an entry.
// Parameters with the same name keep their order: it can carry meaning.
func cacheKey(host, escapedPath, rawQuery string) string {
	host = strings.ToLower(host)
	var b strings.Builder
	b.Grow(len(host) + len(escapedPath) + len(rawQuery) + 1)
	b.WriteString(host)
	b.WriteString(escapedPath)
	if rawQuery != "" {
		b.WriteByte('?')
		b.WriteString(normalizeQuery(rawQuery))
	}
	return b.String()
}

// requestKey is cacheKey for an incoming request.
func requestKey(r *http.Request) string {
	return cacheKey(r.Host, r.URL.EscapedPath(), r.URL.RawQuery)
}

// urlKey is cacheKey for an absolute or host-relative URL (Location, purge).
func urlKey(u *url.URL) string {
	return cacheKey(u.Host, u.EscapedPath(), u.RawQuery)
}

// normalizeQuery sorts query parameters by name, stably, keeping their raw encoding.
func normalizeQuery(q string) string {
	if !strings.Contains(q, "&") {
		return q
	}
	params := strings.Split(q, "&")
	if slices.IsSortedFunc(params, compareParamNames) {
		return q
	}
	slices.SortStableFunc(params, compareParamNames)
	return strings.Join(params, "&")
}

func compareParamNames(a, b string) int {
	an, _, _ := strings.Cut(a, "=")
	bn, _, _ := strings.Cut(b, "=")
	return strings.Compare(an, bn)
}

// varyKey selects a variant: the primary key, the spec's generation and the
// request's values for each header the response varies on. Values are
// normalised only by trimming and joining field lines (RFC 9111 §4.1).
func varyKey(primary string, spec varySpec, h http.Header) (string, []string) {
	var b strings.Builder
	b.WriteString(primary)
	b.WriteString("\x00v")
	b.WriteString(uintString(spec.gen))
	pairs := make([]string, 0, len(spec.names))
	for _, name := range spec.names {
		v := normalizeVaryValue(h.Values(name))
		b.WriteByte(0)
		b.WriteString(name)
		b.WriteByte(':')
		b.WriteString(v)
		pairs = append(pairs, name+":"+v)
	}
	return b.String(), pairs
}

func normalizeVaryValue(values []string) string {
	if len(values) == 0 {
		return "\x01" // absent differs from empty
	}
	parts := make([]string, 0, len(values))
	for _, v := range values {
		for _, p := range strings.Split(v, ",") {
			parts = append(parts, strings.TrimSpace(p))
		}
	}
	return strings.Join(parts, ",")
}

// varyNames returns the canonical, sorted, de-duplicated header names of Vary.
func varyNames(h http.Header) []string {
	toks := headerTokens(h.Values("Vary"))
	if len(toks) == 0 {
		return nil
	}
	names := make([]string, 0, len(toks))
	for _, t := range toks {
		names = append(names, http.CanonicalHeaderKey(t))
	}
	slices.Sort(names)
	return slices.Compact(names)
}

func uintString(n uint64) string {
	if n == 0 {
		return "0"
	}
	var buf [20]byte
	i := len(buf)
	for n > 0 {
		i--
		buf[i] = byte('0' + n%10)
		n /= 10
	}
	return string(buf[i:])
}

package caddymodule

import (
	"net/http"
	"strconv"
	"strings"
	"time"
)

// cacheControl holds the Cache-Control directives Shield acts on (RFC 9111 §5.2).
// A negative duration means the directive is absent.
type cacheControl struct {
	maxAge               time.Duration
	sMaxAge              time.Duration
	maxStale             time.Duration // request only; maxStaleAny when given without a value
	minFresh             time.Duration // request only
	staleWhileRevalidate time.Duration // RFC 5861
	staleIfError         time.Duration // RFC 5861

	noStore         bool
	noCache         bool
	private         bool
	public          bool
	mustRevalidate  bool
	proxyRevalidate bool
	mustUnderstand  bool
	onlyIfCached    bool // request only
	noTransform     bool

	// conflicting is set when a freshness directive appears twice with
	// different values: RFC 9111 §4.2.1 lets a cache treat that as stale.
	conflicting bool
}

// maxStaleAny stands for a max-stale without a value: any staleness is accepted.
const maxStaleAny = time.Duration(1<<63 - 1)

// maxDelta caps delta-seconds values (RFC 9111 §1.2.2: 2^31 seconds).
const maxDelta = 2147483648 * time.Second

// parseCacheControl parses every Cache-Control field line. Unknown directives
// are ignored, as RFC 9111 §5.2 requires; a malformed value disables only its
// own directive, except that a malformed max-age/s-maxage makes the response
// stale rather than fresh (the safe reading for the origin's intent).
func parseCacheControl(values []string) cacheControl {
	cc := cacheControl{
		maxAge: -1, sMaxAge: -1, maxStale: -1, minFresh: -1,
		staleWhileRevalidate: -1, staleIfError: -1,
	}
	for _, line := range values {
		for len(line) > 0 {
			var item string
			item, line = nextDirective(line)
			name, value, hasValue := strings.Cut(item, "=")
			name = strings.ToLower(strings.TrimSpace(name))
			value = strings.TrimSpace(value)
			if hasValue {
				value = unquote(value)
			}
			switch name {
			case "max-age":
				cc.maxAge = cc.setDelta(cc.maxAge, value, hasValue)
			case "s-maxage":
				cc.sMaxAge = cc.setDelta(cc.sMaxAge, value, hasValue)
			case "max-stale":
				if !hasValue {
					cc.maxStale = maxStaleAny
				} else if d, ok := parseDelta(value); ok {
					cc.maxStale = d
				}
			case "min-fresh":
				if d, ok := parseDelta(value); ok && hasValue {
					cc.minFresh = d
				}
			case "stale-while-revalidate":
				if d, ok := parseDelta(value); ok && hasValue {
					cc.staleWhileRevalidate = d
				}
			case "stale-if-error":
				if d, ok := parseDelta(value); ok && hasValue {
					cc.staleIfError = d
				}
			case "no-store":
				cc.noStore = true
			case "no-cache":
				// The qualified form (no-cache="field") allows storing without
				// those fields; Shield takes the stricter unqualified meaning.
				cc.noCache = true
			case "private":
				cc.private = true
			case "public":
				cc.public = true
			case "must-revalidate":
				cc.mustRevalidate = true
			case "proxy-revalidate":
				cc.proxyRevalidate = true
			case "must-understand":
				cc.mustUnderstand = true
			case "only-if-cached":
				cc.onlyIfCached = true
			case "no-transform":
				cc.noTransform = true
			}
		}
	}
	return cc
}

// setDelta records a freshness delta; a second, different value marks the
// header as conflicting, and a malformed one counts as zero (stale).
func (cc *cacheControl) setDelta(prev time.Duration, value string, hasValue bool) time.Duration {
	d, ok := parseDelta(value)
	if !hasValue || !ok {
		d = 0
	}
	if prev >= 0 && prev != d {
		cc.conflicting = true
		return min(prev, d)
	}
	return d
}

// nextDirective splits off one comma-separated directive, honouring quoted strings.
func nextDirective(s string) (item, rest string) {
	inQuote := false
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case '"':
			inQuote = !inQuote
		case '\\':
			if inQuote {
				i++
			}
		case ',':
			if !inQuote {
				return s[:i], s[i+1:]
			}
		}
	}
	return s, ""
}

func unquote(v string) string {
	if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
		return v[1 : len(v)-1]
	}
	return v
}

// parseDelta parses delta-seconds (RFC 9111 §1.2.2): digits only, capped at 2^31.
func parseDelta(v string) (time.Duration, bool) {
	if v == "" {
		return 0, false
	}
	for i := 0; i < len(v); i++ {
		if v[i] < '0' || v[i] > '9' {
			return 0, false
		}
	}
	if len(v) > 10 {
		return maxDelta, true
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		return 0, false
	}
	// Capped before converting: ten digits of seconds overflow a Duration.
	return time.Duration(min(n, int64(maxDelta/time.Second))) * time.Second, true
}

// parseHTTPDate parses an HTTP-date in any of the three formats of RFC 9110 §5.6.7.
func parseHTTPDate(v string) (time.Time, bool) {
	v = strings.TrimSpace(v)
	if v == "" {
		return time.Time{}, false // absent: not worth three failed parses
	}
	if t, ok := parseIMFFixdate(v); ok {
		return t, true
	}
	t, err := http.ParseTime(v) // the obsolete RFC 850 and asctime forms too
	return t, err == nil
}

// parseIMFFixdate reads the preferred HTTP date form ("Sun, 06 Nov 1994
// 08:49:37 GMT", RFC 9110 §5.6.7) without allocating, as conditional
// requests on the hit path need; anything else is left to http.ParseTime.
func parseIMFFixdate(v string) (time.Time, bool) {
	if len(v) != 29 || v[3] != ',' || v[4] != ' ' || v[7] != ' ' || v[11] != ' ' || v[16] != ' ' ||
		v[19] != ':' || v[22] != ':' || v[25:] != " GMT" {
		return time.Time{}, false
	}
	num := func(s string) (int, bool) {
		n := 0
		for i := 0; i < len(s); i++ {
			if s[i] < '0' || s[i] > '9' {
				return 0, false
			}
			n = n*10 + int(s[i]-'0')
		}
		return n, true
	}
	day, ok1 := num(v[5:7])
	year, ok2 := num(v[12:16])
	hour, ok3 := num(v[17:19])
	minute, ok4 := num(v[20:22])
	sec, ok5 := num(v[23:25])
	month := strings.Index("JanFebMarAprMayJunJulAugSepOctNovDec", v[8:11])
	if !(ok1 && ok2 && ok3 && ok4 && ok5) || month < 0 || month%3 != 0 ||
		day < 1 || day > 31 || hour > 23 || minute > 59 || sec > 60 {
		return time.Time{}, false
	}
	t := time.Date(year, time.Month(month/3+1), day, hour, minute, sec, 0, time.UTC)
	if t.Day() != day || !strings.Contains("MonTueWedThuFriSatSun", v[:3]) {
		return time.Time{}, false // 31 Feb, or not a day name: let the full parser judge
	}
	return t, true
}

// headerTokens reports the comma-separated, lower-cased tokens of header lines.
func headerTokens(values []string) []string {
	var out []string
	for _, line := range values {
		for _, tok := range strings.Split(line, ",") {
			if tok = strings.TrimSpace(tok); tok != "" {
				out = append(out, strings.ToLower(tok))
			}
		}
	}
	return out
}

// surrogateDevice is the device token Shield announces in Surrogate-Capability
// and answers to in targeted Surrogate-Control directives (Edge Architecture 1.0).
const surrogateDevice = "shield"

// surrogateCapability is the request header value announcing Shield to the origin.
const surrogateCapability = surrogateDevice + `="Surrogate/1.0"`

// surrogateControl holds the Surrogate-Control directives that apply to Shield.
type surrogateControl struct {
	maxAge  time.Duration // -1 when absent
	noStore bool
}

// parseSurrogateControl reads Surrogate-Control. A directive may target a
// device (`max-age=60;shield`); directives targeted at this device win over
// untargeted ones, and directives for other devices are ignored. Values must
// follow the `=` directly: `max-age =1` is not a max-age.
func parseSurrogateControl(values []string, device string) surrogateControl {
	mine, general := surrogateControl{maxAge: -1}, surrogateControl{maxAge: -1}
	targeted := false
	for _, line := range values {
		for len(line) > 0 {
			var item string
			item, line = nextDirective(line)
			item = strings.TrimSpace(item)
			dir, target, hasTarget := strings.Cut(item, ";")
			dst := &general
			if hasTarget {
				if !strings.EqualFold(strings.TrimSpace(target), device) {
					continue
				}
				dst, targeted = &mine, true
			}
			name, value, _ := strings.Cut(dir, "=")
			switch strings.ToLower(name) {
			case "max-age":
				// max-age=N+M: M is an extra stale allowance Shield leaves to its own rules.
				n, _, _ := strings.Cut(value, "+")
				if d, ok := parseDelta(n); ok {
					dst.maxAge = d
				}
			case "no-store":
				dst.noStore = true
			}
		}
	}
	if targeted {
		return mine
	}
	return general
}

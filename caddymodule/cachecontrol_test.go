package caddymodule

import (
	"net/http"
	"strings"
	"testing"
	"time"
)

func TestParseCacheControl(t *testing.T) {
	none := parseCacheControl(nil)
	with := func(set func(*cacheControl)) cacheControl {
		cc := none
		set(&cc)
		return cc
	}
	for _, tc := range []struct {
		name   string
		values []string
		want   cacheControl
	}{
		{"absent", nil, none},
		{"empty", []string{""}, none},
		{"max-age", []string{"max-age=60"}, with(func(c *cacheControl) { c.maxAge = time.Minute })},
		{"names are case-insensitive", []string{"Max-Age=60, NO-STORE"}, with(func(c *cacheControl) { c.maxAge = time.Minute; c.noStore = true })},
		{"spaces and empty members", []string{" , ,max-age = 5 ,, no-cache ,"}, with(func(c *cacheControl) { c.maxAge = 5 * time.Second; c.noCache = true })},
		{"quoted value", []string{`max-age="60"`}, with(func(c *cacheControl) { c.maxAge = time.Minute })},
		{"s-maxage zero is present", []string{"s-maxage=0"}, with(func(c *cacheControl) { c.sMaxAge = 0 })},
		{"flags", []string{"public, private, must-revalidate, proxy-revalidate, must-understand, only-if-cached, no-transform"},
			with(func(c *cacheControl) {
				c.public, c.private, c.mustRevalidate, c.proxyRevalidate = true, true, true, true
				c.mustUnderstand, c.onlyIfCached, c.noTransform = true, true, true
			})},
		{"unknown directives are ignored", []string{"foo=bar, max-age=3, baz, x=\"y\""}, with(func(c *cacheControl) { c.maxAge = 3 * time.Second })},
		{"several field lines", []string{"max-age=3", "no-store", "stale-if-error=9"},
			with(func(c *cacheControl) { c.maxAge = 3 * time.Second; c.noStore = true; c.staleIfError = 9 * time.Second })},

		// Quoted strings: commas inside them do not split directives.
		{"qualified private", []string{`private="Set-Cookie, X-Foo", max-age=5`},
			with(func(c *cacheControl) { c.private = true; c.maxAge = 5 * time.Second })},
		{"qualified no-cache", []string{`no-cache="Set-Cookie,X-A", no-store`},
			with(func(c *cacheControl) { c.noCache = true; c.noStore = true })},
		{"escaped quote in a quoted string", []string{`ext="a\"b, max-age=1", max-age=3`}, with(func(c *cacheControl) { c.maxAge = 3 * time.Second })},
		{"unterminated quote swallows the rest of the line", []string{`ext="a, max-age=3`, "no-store"}, with(func(c *cacheControl) { c.noStore = true })},

		// Malformed freshness values count as zero: stale rather than fresh.
		{"max-age not a number", []string{"max-age=abc"}, with(func(c *cacheControl) { c.maxAge = 0 })},
		{"max-age without a value", []string{"max-age"}, with(func(c *cacheControl) { c.maxAge = 0 })},
		{"max-age empty", []string{"max-age="}, with(func(c *cacheControl) { c.maxAge = 0 })},
		{"max-age negative", []string{"max-age=-1"}, with(func(c *cacheControl) { c.maxAge = 0 })},
		{"max-age fractional", []string{"max-age=1.5"}, with(func(c *cacheControl) { c.maxAge = 0 })},
		{"s-maxage malformed", []string{"s-maxage=soon"}, with(func(c *cacheControl) { c.sMaxAge = 0 })},
		{"max-age beyond 2^31 is capped", []string{"max-age=99999999999"}, with(func(c *cacheControl) { c.maxAge = maxDelta })},
		{"max-age of ten digits is capped", []string{"max-age=9999999999"}, with(func(c *cacheControl) { c.maxAge = maxDelta })},

		// Malformed values of other directives disable only that directive.
		{"stale-while-revalidate malformed", []string{"stale-while-revalidate=abc, max-age=1"}, with(func(c *cacheControl) { c.maxAge = time.Second })},
		{"stale-while-revalidate without a value", []string{"stale-while-revalidate"}, none},
		{"stale-if-error quoted", []string{`stale-if-error="30"`}, with(func(c *cacheControl) { c.staleIfError = 30 * time.Second })},
		{"max-stale without a value", []string{"max-stale"}, with(func(c *cacheControl) { c.maxStale = maxStaleAny })},
		{"max-stale", []string{"max-stale=5"}, with(func(c *cacheControl) { c.maxStale = 5 * time.Second })},
		{"max-stale malformed", []string{"max-stale=x"}, none},
		{"min-fresh", []string{"min-fresh=7"}, with(func(c *cacheControl) { c.minFresh = 7 * time.Second })},
		{"min-fresh without a value", []string{"min-fresh"}, none},

		// Conflicting duplicates: the smaller value, and the header marked.
		{"duplicate max-age, same value", []string{"max-age=10, max-age=10"}, with(func(c *cacheControl) { c.maxAge = 10 * time.Second })},
		{"conflicting max-age", []string{"max-age=20, max-age=10"},
			with(func(c *cacheControl) { c.maxAge = 10 * time.Second; c.conflicting = true })},
		{"conflicting max-age across lines", []string{"max-age=10", "max-age=20"},
			with(func(c *cacheControl) { c.maxAge = 10 * time.Second; c.conflicting = true })},
		{"conflicting with a malformed duplicate", []string{"max-age=10, max-age=abc"},
			with(func(c *cacheControl) { c.maxAge = 0; c.conflicting = true })},
		{"conflicting s-maxage", []string{"s-maxage=5, s-maxage=6"},
			with(func(c *cacheControl) { c.sMaxAge = 5 * time.Second; c.conflicting = true })},
		{"max-age and s-maxage do not conflict", []string{"max-age=5, s-maxage=6"},
			with(func(c *cacheControl) { c.maxAge = 5 * time.Second; c.sMaxAge = 6 * time.Second })},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := parseCacheControl(tc.values); got != tc.want {
				t.Fatalf("parseCacheControl(%q)\n got %+v\nwant %+v", tc.values, got, tc.want)
			}
		})
	}
}

func TestParseDelta(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want time.Duration
		ok   bool
	}{
		{"0", 0, true},
		{"60", time.Minute, true},
		{"007", 7 * time.Second, true},
		{"2147483648", maxDelta, true},
		{"2147483649", maxDelta, true},
		{"9999999999", maxDelta, true}, // overflows a Duration if converted before capping
		{"9223372037", maxDelta, true},
		{"123456789012345678901234567890", maxDelta, true},
		{"", 0, false},
		{"-1", 0, false},
		{"+1", 0, false},
		{"1.0", 0, false},
		{" 1", 0, false},
		{"1s", 0, false},
	} {
		got, ok := parseDelta(tc.in)
		if got != tc.want || ok != tc.ok {
			t.Errorf("parseDelta(%q) = %v, %v; want %v, %v", tc.in, got, ok, tc.want, tc.ok)
		}
	}
}

// TestParseHTTPDateForms: the fast IMF-fixdate reader agrees with
// http.ParseTime, and the other forms still parse.
func TestParseHTTPDateForms(t *testing.T) {
	for _, v := range []string{
		"Sun, 06 Nov 1994 08:49:37 GMT",  // IMF-fixdate
		"Sunday, 06-Nov-94 08:49:37 GMT", // RFC 850
		"Sun Nov  6 08:49:37 1994",       // asctime
		" Tue, 29 Feb 2028 23:59:59 GMT ",
	} {
		got, ok := parseHTTPDate(v)
		want, err := http.ParseTime(strings.TrimSpace(v))
		if !ok || err != nil || !got.Equal(want) {
			t.Errorf("%q: %v %v, want %v %v", v, got, ok, want, err)
		}
	}
	for _, v := range []string{
		"Sun, 31 Feb 1994 08:49:37 GMT", "Sun, 06 Nov 1994 24:49:37 GMT", "Sun, 06 Xyz 1994 08:49:37 GMT",
		"Sun, 06 Nov 1994 08:49:37 UTC", "Sun, 6 Nov 1994 08:49:37 GMT", "Sun, 06 Nov 19x4 08:49:37 GMT", "",
	} {
		if got, ok := parseHTTPDate(v); ok {
			t.Errorf("%q parsed as %v, want refused", v, got)
		}
	}
	if n := testing.AllocsPerRun(100, func() { parseHTTPDate("Sun, 06 Nov 1994 08:49:37 GMT") }); n != 0 {
		t.Errorf("IMF-fixdate parse allocates %.0f times", n)
	}
}

package caddymodule

import (
	"net/http"
	"testing"
	"time"
)

// freshRespTime is when the test responses "arrive".
var freshRespTime = time.Date(2026, 3, 14, 15, 9, 26, 0, time.UTC)

func freshDate(t time.Time) string { return t.UTC().Format(http.TimeFormat) }

// hdr builds a header from name, value pairs.
func freshHeader(kv ...string) http.Header {
	h := http.Header{}
	for i := 0; i+1 < len(kv); i += 2 {
		h.Add(kv[i], kv[i+1])
	}
	return h
}

func TestDecide(t *testing.T) {
	const minute, hour = time.Minute, time.Hour
	honor := policy{}
	ttl5m := policy{ttl: 5 * minute}
	windows := policy{swr: 30 * time.Second, sie: hour}
	ignore := policy{ignoreOrigin: true, ttl: minute, swr: 30 * time.Second, sie: hour}
	honorClient := policy{honorClient: true}
	date := freshDate(freshRespTime)

	type want struct {
		storable       bool
		reason         string
		lifetime       time.Duration
		swr, sie       time.Duration
		mustRevalidate bool
		noCache        bool
	}
	for _, tc := range []struct {
		name   string
		pol    policy
		req    http.Header
		status int
		resp   http.Header
		want   want
	}{
		// Where the lifetime comes from: s-maxage > max-age > Expires-Date > ttl > Last-Modified.
		{"s-maxage over max-age", honor, nil, 200, freshHeader("Cache-Control", "max-age=10, s-maxage=30"),
			want{storable: true, lifetime: 30 * time.Second, mustRevalidate: true}},
		{"max-age over Expires", honor, nil, 200, freshHeader("Cache-Control", "max-age=10", "Date", date, "Expires", freshDate(freshRespTime.Add(hour))),
			want{storable: true, lifetime: 10 * time.Second}},
		{"Expires minus Date, on the origin's clock", honor, nil, 200,
			freshHeader("Date", freshDate(freshRespTime.Add(-5*time.Second)), "Expires", freshDate(freshRespTime.Add(15*time.Second))),
			want{storable: true, lifetime: 20 * time.Second}},
		{"Expires without Date counts from the response time", honor, nil, 200, freshHeader("Expires", freshDate(freshRespTime.Add(30*time.Second))),
			want{storable: true, lifetime: 30 * time.Second}},
		{"Expires before Date is expired", honor, nil, 200, freshHeader("Date", date, "Expires", freshDate(freshRespTime.Add(-hour)), "ETag", `"x"`),
			want{storable: true}},
		{"invalid Expires is expired", honor, nil, 200, freshHeader("Expires", "0", "ETag", `"x"`), want{storable: true}},
		{"Expires over ttl", ttl5m, nil, 200, freshHeader("Date", date, "Expires", freshDate(freshRespTime.Add(20*time.Second))),
			want{storable: true, lifetime: 20 * time.Second}},
		{"max-age over ttl", ttl5m, nil, 200, freshHeader("Cache-Control", "max-age=10"), want{storable: true, lifetime: 10 * time.Second}},
		{"ttl when the origin gives no lifetime", ttl5m, nil, 200, freshHeader("Last-Modified", freshDate(freshRespTime.Add(-10*hour))),
			want{storable: true, lifetime: 5 * minute}},
		{"Last-Modified heuristic: a tenth of the age", honor, nil, 200,
			freshHeader("Date", date, "Last-Modified", freshDate(freshRespTime.Add(-10*hour))), want{storable: true, lifetime: hour}},
		{"Last-Modified heuristic is capped", honor, nil, 200,
			freshHeader("Date", date, "Last-Modified", freshDate(freshRespTime.Add(-100*24*hour))), want{storable: true, lifetime: heuristicCap}},
		{"huge max-age is capped", honor, nil, 200, freshHeader("Cache-Control", "max-age=9999999999"),
			want{storable: true, lifetime: maxDelta}},
		{"conflicting max-age is stale", honor, nil, 200, freshHeader("Cache-Control", "max-age=60, max-age=120", "ETag", `"x"`),
			want{storable: true}},
		{"no lifetime, no validator, no window", honor, nil, 200, freshHeader(), want{reason: "no-freshness"}},
		{"a stale window alone is worth storing", honor, nil, 200, freshHeader("Cache-Control", "max-age=0, stale-if-error=60"),
			want{storable: true, sie: minute}},

		// origin_cache_control ignore: the rule's ttl and windows win, the prohibitions stay.
		{"ignore: ttl over max-age", ignore, nil, 200,
			freshHeader("Cache-Control", "max-age=10, stale-while-revalidate=5, stale-if-error=7, must-revalidate"),
			want{storable: true, lifetime: minute, swr: 30 * time.Second, sie: hour}},
		{"ignore: no-cache does not apply", ignore, nil, 200, freshHeader("Cache-Control", "no-cache"),
			want{storable: true, lifetime: minute, swr: 30 * time.Second, sie: hour}},
		{"ignore: the origin's window where the rule has none", policy{ignoreOrigin: true, ttl: minute}, nil, 200,
			freshHeader("Cache-Control", "stale-while-revalidate=5"), want{storable: true, lifetime: minute, swr: 5 * time.Second}},
		{"ignore: no-store still forbids", ignore, nil, 200, freshHeader("Cache-Control", "no-store"), want{reason: "no-store"}},
		{"ignore: private still forbids", ignore, nil, 200, freshHeader("Cache-Control", "private"), want{reason: "private"}},
		{"ignore: Set-Cookie still forbids", ignore, nil, 200, freshHeader("Set-Cookie", "a=b"), want{reason: "set-cookie"}},

		// Stale windows under honor: the origin's (RFC 5861) over the rule's.
		{"honor: the origin's windows", windows, nil, 200, freshHeader("Cache-Control", "max-age=10, stale-while-revalidate=5, stale-if-error=7"),
			want{storable: true, lifetime: 10 * time.Second, swr: 5 * time.Second, sie: 7 * time.Second}},
		{"honor: the rule's windows when the origin has none", windows, nil, 200, freshHeader("Cache-Control", "max-age=10"),
			want{storable: true, lifetime: 10 * time.Second, swr: 30 * time.Second, sie: hour}},
		{"honor: an origin window of zero is a window of zero", windows, nil, 200, freshHeader("Cache-Control", "max-age=10, stale-if-error=0"),
			want{storable: true, lifetime: 10 * time.Second, swr: 30 * time.Second}},
		{"must-revalidate: never stale", windows, nil, 200, freshHeader("Cache-Control", "max-age=10, must-revalidate, stale-while-revalidate=30"),
			want{storable: true, lifetime: 10 * time.Second, mustRevalidate: true}},
		{"proxy-revalidate: never stale", windows, nil, 200, freshHeader("Cache-Control", "max-age=10, proxy-revalidate"),
			want{storable: true, lifetime: 10 * time.Second, mustRevalidate: true}},
		{"no-cache with a validator: stored, revalidated on every use", windows, nil, 200, freshHeader("Cache-Control", "max-age=60, no-cache", "ETag", `"x"`),
			want{storable: true, noCache: true}},
		{"no-cache without a validator", honor, nil, 200, freshHeader("Cache-Control", "no-cache"), want{reason: "no-freshness"}},

		// What may never be stored.
		{"no-store", honor, nil, 200, freshHeader("Cache-Control", "max-age=60, no-store"), want{reason: "no-store"}},
		{"private", honor, nil, 200, freshHeader("Cache-Control", "max-age=60, private"), want{reason: "private"}},
		{"Set-Cookie", honor, nil, 200, freshHeader("Cache-Control", "max-age=60", "Set-Cookie", "sid=1"), want{reason: "set-cookie"}},
		{"Authorization", honor, freshHeader("Authorization", "Bearer x"), 200, freshHeader("Cache-Control", "max-age=60"), want{reason: "authorization"}},
		{"Authorization with public", honor, freshHeader("Authorization", "Bearer x"), 200, freshHeader("Cache-Control", "max-age=60, public"),
			want{storable: true, lifetime: minute}},
		{"Authorization with s-maxage", honor, freshHeader("Authorization", "Bearer x"), 200, freshHeader("Cache-Control", "s-maxage=60"),
			want{storable: true, lifetime: minute, mustRevalidate: true}},
		{"Authorization with must-revalidate", honor, freshHeader("Authorization", "Bearer x"), 200, freshHeader("Cache-Control", "max-age=60, must-revalidate"),
			want{storable: true, lifetime: minute, mustRevalidate: true}},
		{"Vary: *", honor, nil, 200, freshHeader("Cache-Control", "max-age=60", "Vary", "Accept, *"), want{reason: "vary-star"}},
		{"client no-store, honored", honorClient, freshHeader("Cache-Control", "no-store"), 200, freshHeader("Cache-Control", "max-age=60"),
			want{reason: "request-no-store"}},
		{"client no-store, ignored", honor, freshHeader("Cache-Control", "no-store"), 200, freshHeader("Cache-Control", "max-age=60"),
			want{storable: true, lifetime: minute}},

		// Statuses.
		{"206", honor, nil, 206, freshHeader("Cache-Control", "max-age=60"), want{reason: "status"}},
		{"304", honor, nil, 304, freshHeader("Cache-Control", "max-age=60"), want{reason: "status"}},
		{"1xx", honor, nil, 103, freshHeader("Cache-Control", "max-age=60"), want{reason: "status"}},
		{"404 is cacheable by default", ttl5m, nil, 404, freshHeader(), want{storable: true, lifetime: 5 * minute}},
		{"500 without a lifetime", ttl5m, nil, 500, freshHeader(), want{reason: "status"}},
		{"500 with max-age", honor, nil, 500, freshHeader("Cache-Control", "max-age=60"), want{storable: true, lifetime: minute}},
		{"302 needs explicit freshness", ttl5m, nil, 302, freshHeader(), want{reason: "status"}},
		{"302 with public takes the ttl", ttl5m, nil, 302, freshHeader("Cache-Control", "public"), want{storable: true, lifetime: 5 * minute}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req := tc.req
			if req == nil {
				req = http.Header{}
			}
			d := decide(&tc.pol, req, tc.status, tc.resp, freshRespTime, freshRespTime)
			got := want{d.storable, d.reason, d.lifetime, d.swr, d.sie, d.mustRevalidate, d.noCache}
			if !d.storable {
				got = want{reason: d.reason} // the rest means nothing then
			}
			if got != tc.want {
				t.Fatalf("decide\n got %+v\nwant %+v", got, tc.want)
			}
		})
	}
}

func TestInitialAge(t *testing.T) {
	resp := freshRespTime
	for _, tc := range []struct {
		name  string
		h     http.Header
		delay time.Duration // between request and response
		want  time.Duration
	}{
		{"nothing said: the response delay", freshHeader(), 2 * time.Second, 2 * time.Second},
		{"Age plus the response delay", freshHeader("Age", "100"), 2 * time.Second, 102 * time.Second},
		{"Date older than Age says", freshHeader("Date", freshDate(resp.Add(-50*time.Second)), "Age", "10"), time.Second, 50 * time.Second},
		{"Age older than Date says", freshHeader("Date", freshDate(resp.Add(-5*time.Second)), "Age", "30"), time.Second, 31 * time.Second},
		{"Date in the future counts as now", freshHeader("Date", freshDate(resp.Add(30*time.Second))), time.Second, time.Second},
		{"Age list: the first member counts", freshHeader("Age", "5, 70"), 0, 5 * time.Second},
		{"huge Age is capped, not wrapped into a small one", freshHeader("Age", "9999999999"), 0, maxDelta},
		{"unreadable Age is stale", freshHeader("Age", "abc"), 0, maxDelta},
		{"Age on two lines is unreadable", freshHeader("Age", "5", "Age", "6"), 0, maxDelta},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := initialAge(tc.h, resp.Add(-tc.delay), resp); got != tc.want {
				t.Fatalf("initialAge = %v, want %v", got, tc.want)
			}
		})
	}
	// decide reports the same age.
	d := decide(&policy{}, http.Header{}, 200, freshHeader("Cache-Control", "max-age=60", "Age", "30"), resp.Add(-time.Second), resp)
	if d.initialAge != 31*time.Second {
		t.Fatalf("decide's initialAge = %v, want 31s", d.initialAge)
	}
}

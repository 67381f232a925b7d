package caddymodule

import (
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddytest"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	_ "github.com/caddyserver/caddy/v2/modules/standard"
)

func dur(s string) *caddy.Duration {
	d, err := caddy.ParseDuration(s)
	if err != nil {
		panic(err)
	}
	cd := caddy.Duration(d)
	return &cd
}

func boolp(b bool) *bool { return &b }

func TestUnmarshalCaddyfile(t *testing.T) {
	for _, tc := range []struct {
		name    string
		input   string
		want    Handler
		wantErr string // a substring of the error, with the line it names
	}{
		// Accepted.
		{name: "bare directive", input: `shield`, want: Handler{}},
		{name: "empty block", input: "shield {\n}", want: Handler{}},
		{
			name: "every block option",
			input: `shield {
				zone api
				memory 256MiB
				max_object_size 512KiB
				origin_rate 50/s
				origin_burst 10
				origin_concurrency 4
				tag_header Cache-Tag
				ttl 1m
				stale_while_revalidate 30s
				stale_if_error 1h
				origin_cache_control ignore
				client_cache_control honor
				max_wait 2s
				origin_timeout 10s
			}`,
			want: Handler{
				Zone: "api", Memory: 256 << 20, MaxObjectSize: 512 << 10,
				OriginRate: "50/s", OriginBurst: 10, OriginConcurrency: 4, TagHeader: "Cache-Tag",
				RuleOptions: RuleOptions{
					TTL: dur("1m"), StaleWhileRevalidate: dur("30s"), StaleIfError: dur("1h"),
					OriginCacheControl: "ignore", ClientCacheControl: "honor",
					MaxWait: dur("2s"), OriginTimeout: dur("10s"),
				},
			},
		},
		{
			name:  "decimal sizes and day durations",
			input: "shield {\n memory 64MB\n max_object_size 2KB\n stale_if_error 1d\n}",
			want: Handler{Memory: 64_000_000, MaxObjectSize: 2000,
				RuleOptions: RuleOptions{StaleIfError: dur("24h")}},
		},
		{
			name:  "bypass as the block default",
			input: "shield {\n bypass\n}",
			want:  Handler{RuleOptions: RuleOptions{Bypass: boolp(true)}},
		},
		{
			name: "rules in order, options over the block's defaults",
			input: `shield {
				ttl 10s
				rule /users/* /profiles/* {
					ttl 5m
					stale_while_revalidate 1m
					origin_cache_control ignore
				}
				rule /pay/* {
					bypass
				}
				rule /plain
				origin_cache_control honor
			}`,
			want: Handler{
				RuleOptions: RuleOptions{TTL: dur("10s"), OriginCacheControl: "honor"},
				Rules: []Rule{
					{Path: caddyhttp.MatchPath{"/users/*", "/profiles/*"},
						RuleOptions: RuleOptions{TTL: dur("5m"), StaleWhileRevalidate: dur("1m"), OriginCacheControl: "ignore"}},
					{Path: caddyhttp.MatchPath{"/pay/*"}, RuleOptions: RuleOptions{Bypass: boolp(true)}},
					{Path: caddyhttp.MatchPath{"/plain"}},
				},
			},
		},
		{
			name:  "the same option in two rules",
			input: "shield {\n rule /a {\n  ttl 1s\n }\n rule /b {\n  ttl 2s\n }\n}",
			want: Handler{Rules: []Rule{
				{Path: caddyhttp.MatchPath{"/a"}, RuleOptions: RuleOptions{TTL: dur("1s")}},
				{Path: caddyhttp.MatchPath{"/b"}, RuleOptions: RuleOptions{TTL: dur("2s")}},
			}},
		},

		// Rejected: one case or more per subdirective and per kind of mistake.
		{name: "argument on the directive", input: "shield fast {\n}", wantErr: "wrong argument count or unexpected line ending after 'fast', at Testfile:1"},
		{name: "unknown subdirective", input: "shield {\n zone a\n colour blue\n}", wantErr: `unrecognized subdirective "colour", at Testfile:3`},
		{name: "unknown rule subdirective", input: "shield {\n rule /a {\n  cache yes\n }\n}", wantErr: `unrecognized rule subdirective "cache", at Testfile:3`},

		{name: "zone without a name", input: "shield {\n zone\n}", wantErr: "wrong argument count or unexpected line ending after 'zone', at Testfile:2"},
		{name: "zone with two names", input: "shield {\n zone a b\n}", wantErr: "wrong argument count or unexpected line ending after 'b', at Testfile:2"},
		{name: "zone twice", input: "shield {\n zone a\n zone b\n}", wantErr: "zone already specified, at Testfile:3"},

		{name: "memory not a size", input: "shield {\n memory lots\n}", wantErr: `invalid memory "lots": want a size such as 256MiB, at Testfile:2`},
		{name: "memory zero", input: "shield {\n memory 0\n}", wantErr: `invalid memory "0"`},
		{name: "memory missing", input: "shield {\n memory\n}", wantErr: "wrong argument count or unexpected line ending after 'memory', at Testfile:2"},
		{name: "memory twice", input: "shield {\n memory 1GiB\n memory 2GiB\n}", wantErr: "memory already specified, at Testfile:3"},
		{name: "max_object_size not a size", input: "shield {\n max_object_size 1Mebibyte\n}", wantErr: `invalid max_object_size "1Mebibyte"`},
		{name: "max_object_size beyond a petabyte", input: "shield {\n max_object_size 2PiB\n}", wantErr: `invalid max_object_size "2PiB"`},
		{name: "max_object_size negative", input: "shield {\n max_object_size -1KiB\n}", wantErr: `invalid max_object_size "-1KiB"`},

		{name: "origin_rate without a unit", input: "shield {\n origin_rate 50\n}", wantErr: `invalid origin_rate "50": want <n>/<s|m|h>, e.g. 50/s, at Testfile:2`},
		{name: "origin_rate bad unit", input: "shield {\n origin_rate 50/d\n}", wantErr: `invalid origin_rate "50/d": unit must be s, m or h, at Testfile:2`},
		{name: "origin_rate zero", input: "shield {\n origin_rate 0/s\n}", wantErr: `invalid origin_rate "0/s"`},
		{name: "origin_rate not a number", input: "shield {\n origin_rate fast/s\n}", wantErr: `invalid origin_rate "fast/s"`},
		{name: "origin_rate infinite", input: "shield {\n origin_rate Inf/s\n}", wantErr: `invalid origin_rate "Inf/s"`},
		{name: "origin_rate missing", input: "shield {\n origin_rate\n}", wantErr: "wrong argument count or unexpected line ending after 'origin_rate'"},
		{name: "origin_burst zero", input: "shield {\n origin_burst 0\n}", wantErr: `invalid origin_burst "0": want a positive whole number, at Testfile:2`},
		{name: "origin_burst not a number", input: "shield {\n origin_burst many\n}", wantErr: `invalid origin_burst "many"`},
		{name: "origin_concurrency negative", input: "shield {\n origin_concurrency -2\n}", wantErr: `invalid origin_concurrency "-2"`},
		{name: "origin_concurrency fraction", input: "shield {\n origin_concurrency 1.5\n}", wantErr: `invalid origin_concurrency "1.5"`},
		{name: "tag_header missing", input: "shield {\n tag_header\n}", wantErr: "wrong argument count or unexpected line ending after 'tag_header'"},

		{name: "ttl not a duration", input: "shield {\n ttl forever\n}", wantErr: `invalid ttl "forever"`},
		{name: "ttl negative", input: "shield {\n ttl -5s\n}", wantErr: `invalid ttl "-5s": cannot be negative, at Testfile:2`},
		{name: "ttl missing", input: "shield {\n ttl\n}", wantErr: "wrong argument count or unexpected line ending after 'ttl', at Testfile:2"},
		{name: "ttl with two values", input: "shield {\n ttl 1s 2s\n}", wantErr: "wrong argument count or unexpected line ending after '2s'"},
		{name: "ttl twice", input: "shield {\n ttl 1s\n ttl 2s\n}", wantErr: "ttl already specified, at Testfile:3"},
		{name: "stale_while_revalidate bad", input: "shield {\n stale_while_revalidate 5 minutes\n}", wantErr: "wrong argument count or unexpected line ending after 'minutes'"},
		{name: "stale_while_revalidate unit", input: "shield {\n stale_while_revalidate 5x\n}", wantErr: `invalid stale_while_revalidate "5x"`},
		{name: "stale_if_error bad", input: "shield {\n stale_if_error soon\n}", wantErr: `invalid stale_if_error "soon": time: invalid duration "soon", at Testfile:2`},
		{name: "max_wait zero", input: "shield {\n max_wait 0s\n}", wantErr: "max_wait must be positive, at Testfile:2"},
		{name: "max_wait bad", input: "shield {\n max_wait never\n}", wantErr: `invalid max_wait "never"`},
		{name: "origin_timeout zero", input: "shield {\n origin_timeout 0\n}", wantErr: "origin_timeout must be positive, at Testfile:2"},
		{name: "origin_timeout bad", input: "shield {\n origin_timeout 1h2\n}", wantErr: `invalid origin_timeout "1h2"`},

		{name: "bypass with an argument", input: "shield {\n bypass yes\n}", wantErr: "wrong argument count or unexpected line ending after 'yes', at Testfile:2"},
		{name: "bypass twice", input: "shield {\n bypass\n bypass\n}", wantErr: "bypass already specified, at Testfile:3"},
		{name: "ttl with bypass in the block", input: "shield {\n bypass\n ttl 1m\n}", wantErr: "ttl cannot be set together with bypass"},
		{name: "ttl on a bypass rule", input: "shield {\n rule /pay/* {\n  bypass\n  ttl 1m\n }\n}", wantErr: "ttl cannot be set on a bypass rule, at Testfile:5"},
		{name: "ttl before bypass in a rule", input: "shield {\n rule /pay/* {\n  ttl 1m\n  bypass\n }\n}", wantErr: "ttl cannot be set on a bypass rule"},

		{name: "origin_cache_control bad choice", input: "shield {\n origin_cache_control obey\n}", wantErr: `invalid origin_cache_control "obey": want honor or ignore, at Testfile:2`},
		{name: "origin_cache_control missing", input: "shield {\n origin_cache_control\n}", wantErr: "wrong argument count or unexpected line ending after 'origin_cache_control'"},
		{name: "client_cache_control bad choice", input: "shield {\n rule /a {\n  client_cache_control Honor\n }\n}", wantErr: `invalid client_cache_control "Honor": want honor or ignore, at Testfile:3`},

		{name: "rule without a path", input: "shield {\n rule {\n  ttl 1s\n }\n}", wantErr: "rule needs at least one path pattern, at Testfile:2"},
		{name: "rule option twice in a rule", input: "shield {\n rule /a {\n  ttl 1s\n  ttl 2s\n }\n}", wantErr: "ttl already specified in this rule, at Testfile:4"},
		{name: "zone inside a rule", input: "shield {\n rule /a {\n  zone other\n }\n}", wantErr: "zone belongs to the shield block, not to a rule, at Testfile:3"},
		{name: "memory inside a rule", input: "shield {\n rule /a {\n  memory 1GiB\n }\n}", wantErr: "memory belongs to the shield block, not to a rule"},
		{name: "max_object_size inside a rule", input: "shield {\n rule /a {\n  max_object_size 1KiB\n }\n}", wantErr: "max_object_size belongs to the shield block"},
		{name: "origin_rate inside a rule", input: "shield {\n rule /a {\n  origin_rate 5/s\n }\n}", wantErr: "origin_rate belongs to the shield block"},
		{name: "rule inside a rule", input: "shield {\n rule /a {\n  rule /b\n }\n}", wantErr: "rule belongs to the shield block"},
		{name: "rule pattern that never matches", input: "shield {\n rule /a/* users/* {\n  ttl 1s\n }\n}", wantErr: `path pattern "users/*" never matches: it must start with / or *, at Testfile:2`},
		{name: "ttl in a rule under a bypassed block", input: "shield {\n bypass\n rule /a/* {\n  stale_if_error 1m\n  ttl 1m\n }\n}", wantErr: "ttl on a rule that inherits bypass from the shield block, at Testfile:5"},
		{name: "tag_header naming Set-Cookie", input: "shield {\n tag_header set-cookie\n}", wantErr: "tag_header Set-Cookie: a header with its own meaning; use one of your own, such as Surrogate-Key, at Testfile:2"},
		{name: "tag_header naming a Content- field", input: "shield {\n tag_header Content-Type\n}", wantErr: "tag_header Content-Type: a header with its own meaning"},
		{name: "memory below the minimum", input: "shield {\n memory 512KiB\n max_object_size 1KiB\n}", wantErr: "memory 512 KiB is below the minimum of 1MiB, at Testfile:2"},
		{name: "memory too small for max_object_size", input: "shield {\n zone z\n memory 2MiB\n}", wantErr: "memory 2.0 MiB must be at least four times max_object_size plus 64KiB (4.3 MiB for max_object_size 1.0 MiB), at Testfile:3"},
		{name: "max_object_size too large for the default memory", input: "shield {\n max_object_size 64MiB\n}", wantErr: "must be at least four times max_object_size plus 64KiB (256 MiB for max_object_size 64 MiB), at Testfile:2"},
		{name: "origin_rate too slow", input: "shield {\n origin_rate 1e-300/s\n}", wantErr: `invalid origin_rate "1e-300/s": want <n>/<s|m|h>`},
		{name: "origin_rate in hex", input: "shield {\n origin_rate 0x1p4/s\n}", wantErr: `invalid origin_rate "0x1p4/s"`},
		{name: "origin_rate below one an hour", input: "shield {\n origin_rate 0.5/h\n}", wantErr: `invalid origin_rate "0.5/h": at least 1/h`},
		{name: "bad option after a good rule", input: "shield {\n rule /a {\n  ttl 1s\n }\n ttl soon\n}", wantErr: `invalid ttl "soon": time: invalid duration "soon", at Testfile:5`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got Handler
			err := got.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input))
			if tc.wantErr != "" {
				if err == nil {
					t.Fatalf("no error, want %q; got %+v", tc.wantErr, got)
				}
				if !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %q, want it to contain %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("unexpected error: %v", err)
			}
			got.src = nil // where options were written: checked by the error cases
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("got  %+v\nwant %+v", got, tc.want)
			}
		})
	}
}

// TestPolicyBypassInheritedWithTTL checks the same rule at Provision, where
// JSON configs land too: a rule that is bypassed (by its own option or the
// block's) cannot also set a ttl, which would be silently ignored.
func TestPolicyBypassInheritedWithTTL(t *testing.T) {
	base := policy{maxWait: time.Second, originTimeout: time.Second}
	if _, err := base.with(RuleOptions{Bypass: boolp(true), TTL: dur("1m")}); err == nil {
		t.Fatal("bypass with ttl accepted")
	}
	blockBypass, err := base.with(RuleOptions{Bypass: boolp(true)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := blockBypass.with(RuleOptions{TTL: dur("1m")}); err == nil || !strings.Contains(err.Error(), "ttl on a bypass rule") {
		t.Fatalf("a ttl under a bypass block: error %v, want ttl on a bypass rule", err)
	}
	// In JSON a rule may turn bypass off again, and then set a ttl.
	p, err := blockBypass.with(RuleOptions{Bypass: boolp(false), TTL: dur("1m")})
	if err != nil || p.bypass || p.ttl != time.Minute {
		t.Fatalf("bypass false with ttl: %+v, %v", p, err)
	}
}

// TestCaddyfileAdapt pins the JSON a representative Caddyfile adapts to: the
// directive sorts before reverse_proxy without an order line, wherever it is
// written, and every option maps to its documented JSON field.
func TestCaddyfileAdapt(t *testing.T) {
	caddytest.AssertAdapt(t, `:8080 {
	reverse_proxy localhost:9000
	shield {
		zone api
		memory 64MiB
		max_object_size 512KiB
		ttl 30s
		stale_if_error 10m
		rule /users/* /profiles/* {
			ttl 5m
			stale_while_revalidate 1m
			origin_cache_control ignore
		}
		rule /pay/* {
			bypass
		}
	}
}`, "caddyfile", `{
	"apps": {
		"http": {
			"servers": {
				"srv0": {
					"listen": [
						":8080"
					],
					"routes": [
						{
							"handle": [
								{
									"handler": "shield",
									"max_object_size": 524288,
									"memory": 67108864,
									"rules": [
										{
											"origin_cache_control": "ignore",
											"path": [
												"/users/*",
												"/profiles/*"
											],
											"stale_while_revalidate": 60000000000,
											"ttl": 300000000000
										},
										{
											"bypass": true,
											"path": [
												"/pay/*"
											]
										}
									],
									"stale_if_error": 600000000000,
									"ttl": 30000000000,
									"zone": "api"
								},
								{
									"handler": "reverse_proxy",
									"upstreams": [
										{
											"dial": "localhost:9000"
										}
									]
								}
							]
						}
					]
				}
			}
		}
	}
}`)
}

// TestCaddyfileAcrossBlocks: what only shows across blocks or against the
// global options fails at adapt, with the file and line.
func TestCaddyfileAcrossBlocks(t *testing.T) {
	for _, tc := range []struct {
		name, input, wantErr string
	}{
		{"zone with two sizes", ":8080 {\n\tshield {\n\t\tzone api\n\t\tmemory 64MiB\n\t}\n}\n:8081 {\n\tshield {\n\t\tzone api\n\t\tmemory 32MiB\n\t}\n}\n",
			`zone "api" is declared twice with different sizes (memory 67108864 and 33554432, max_object_size 1048576 and 1048576) (first declared at Caddyfile:3), at Caddyfile:9`},
		{"default zone with two sizes", ":8080 {\n\tshield\n}\n:8081 {\n\tshield {\n\t\tmax_object_size 2MiB\n\t}\n}\n",
			`zone "default" is declared twice with different sizes`},
		{"zone with two budgets", ":8080 {\n\tshield {\n\t\tzone api\n\t\torigin_rate 5/s\n\t}\n\thandle /x {\n\t\tshield {\n\t\t\tzone api\n\t\t\torigin_rate 6/s\n\t\t}\n\t}\n}\n",
			`zone "api" is declared twice with different origin budgets (origin_rate, origin_burst, origin_concurrency) (first declared at Caddyfile:3), at Caddyfile:8`},
		{"cluster on without a cluster", ":8080 {\n\tshield {\n\t\tcluster on\n\t}\n}\n",
			"cluster on, but no cluster is configured (global option: shield { cluster redis { ... } }), at Caddyfile:3"},
		{"cluster on and off for one zone", "{\n\tshield {\n\t\tcluster redis {\n\t\t\taddress 127.0.0.1:1\n\t\t}\n\t}\n}\n:8080 {\n\tshield\n}\n:8081 {\n\tshield {\n\t\tcluster off\n\t}\n}\n",
			`zone "default" is declared with cluster on and off`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			adapter := caddyconfig.GetAdapter("caddyfile")
			_, _, err := adapter.Adapt([]byte(tc.input), map[string]any{"filename": "Caddyfile"})
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("error %v, want it to contain %q", err, tc.wantErr)
			}
		})
	}
	// Blocks that agree, or leave the budget to the one that sets it, adapt;
	// without a cluster, cluster off is what every block has anyway.
	for _, ok := range []string{
		":8080 {\n\tshield {\n\t\tzone api\n\t\torigin_rate 5/s\n\t}\n}\n:8081 {\n\tshield {\n\t\tzone api\n\t\tttl 1m\n\t}\n}\n",
		":8080 {\n\tshield\n}\n:8081 {\n\tshield {\n\t\tcluster off\n\t}\n}\n",
		// The same budget written two ways: as Provision reads it, not as written.
		":8080 {\n\tshield {\n\t\tzone api\n\t\torigin_rate 5/s\n\t}\n}\n:8081 {\n\tshield {\n\t\tzone api\n\t\torigin_rate 300/m\n\t\torigin_burst 5\n\t}\n}\n",
	} {
		if _, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(ok), nil); err != nil {
			t.Fatalf("agreeing blocks refused: %v\n%s", err, ok)
		}
	}
}

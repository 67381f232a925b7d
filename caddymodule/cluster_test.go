package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"math"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
)

func TestParseShieldOption(t *testing.T) {
	for _, tc := range []struct {
		name    string
		input   string
		want    RedisConfig
		wantErr string
	}{
		{
			name: "address only",
			input: `shield {
				cluster redis {
					address 127.0.0.1:6379
				}
			}`,
			want: RedisConfig{Address: "127.0.0.1:6379"},
		},
		{
			name: "every option",
			input: `shield {
				cluster redis {
					address rediss://redis.internal:6380
					key_prefix shield:prod
					timeout 40ms
					fallback local
					db 2
					username {env.REDIS_USER}
					password {env.REDIS_PASSWORD}
					tls {
						server_name redis.internal
						ca_file /etc/ssl/redis-ca.pem
						insecure_skip_verify
					}
					pool_size 20
					dial_timeout 2s
					max_l2_object_size 256KiB
					lease 5s
				}
			}`,
			want: RedisConfig{
				Address: "rediss://redis.internal:6380", KeyPrefix: "shield:prod", Timeout: *dur("40ms"),
				Fallback: "local", DB: 2, Username: "{env.REDIS_USER}", Password: "{env.REDIS_PASSWORD}",
				TLS:      &RedisTLS{ServerName: "redis.internal", CAFile: "/etc/ssl/redis-ca.pem", InsecureSkipVerify: true},
				PoolSize: 20, DialTimeout: *dur("2s"), MaxL2ObjectSize: 256 << 10, Lease: *dur("5s"),
			},
		},
		{name: "tls alone", input: "shield {\n\tcluster redis {\n\t\taddress r:1\n\t\ttls\n\t}\n}", want: RedisConfig{Address: "r:1", TLS: &RedisTLS{}}},
		{name: "no address", input: "shield {\n\tcluster redis {\n\t\tkey_prefix x\n\t}\n}", wantErr: "needs an address"},
		{name: "other engine", input: "shield {\n\tcluster etcd {\n\t}\n}", wantErr: `unsupported cluster engine "etcd"`},
		{name: "no engine", input: "shield {\n\tcluster\n}", wantErr: "wrong argument count"},
		{name: "unknown option", input: "shield {\n\tcluster redis {\n\t\taddress a:1\n\t\tspeed 9\n\t}\n}", wantErr: `unrecognized cluster redis option "speed"`},
		{name: "duplicate", input: "shield {\n\tcluster redis {\n\t\taddress a:1\n\t\taddress b:1\n\t}\n}", wantErr: "address already specified"},
		{name: "bad fallback", input: "shield {\n\tcluster redis {\n\t\taddress a:1\n\t\tfallback all\n\t}\n}", wantErr: `invalid fallback "all"`},
		{name: "bad timeout", input: "shield {\n\tcluster redis {\n\t\taddress a:1\n\t\ttimeout soon\n\t}\n}", wantErr: `invalid timeout "soon"`},
		{name: "zero lease", input: "shield {\n\tcluster redis {\n\t\taddress a:1\n\t\tlease 0s\n\t}\n}", wantErr: "lease must be positive"},
		{name: "bad db", input: "shield {\n\tcluster redis {\n\t\taddress a:1\n\t\tdb -1\n\t}\n}", wantErr: `invalid db "-1"`},
		{name: "bad size", input: "shield {\n\tcluster redis {\n\t\taddress a:1\n\t\tmax_l2_object_size big\n\t}\n}", wantErr: `invalid max_l2_object_size "big"`},
		{name: "unknown tls option", input: "shield {\n\tcluster redis {\n\t\taddress a:1\n\t\ttls {\n\t\t\tcert x\n\t\t}\n\t}\n}", wantErr: `unrecognized tls option "cert"`},
		{name: "unknown shield option", input: "shield {\n\tcache 1\n}", wantErr: `unrecognized shield option "cache"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, err := parseShieldOption(caddyfile.NewTestDispenser(tc.input), nil)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			app, ok := v.(httpcaddyfile.App)
			if !ok || app.Name != "shield" {
				t.Fatalf("got %#v, want the shield app", v)
			}
			var got App
			if err := json.Unmarshal(app.Value, &got); err != nil {
				t.Fatal(err)
			}
			if got.Cluster == nil || got.Cluster.Redis == nil {
				t.Fatalf("no cluster in %s", app.Value)
			}
			gotJSON, _ := json.Marshal(got.Cluster.Redis)
			wantJSON, _ := json.Marshal(tc.want)
			if string(gotJSON) != string(wantJSON) {
				t.Fatalf("got %s\nwant %s", gotJSON, wantJSON)
			}
		})
	}
	if _, err := parseShieldOption(caddyfile.NewTestDispenser("shield"), httpcaddyfile.App{}); err == nil {
		t.Fatal("a second shield global option was accepted")
	}
}

// TestClusterAdapt pins the JSON of a Caddyfile with the global option and
// the handler's cluster switch.
func TestClusterAdapt(t *testing.T) {
	input := `{
	shield {
		cluster redis {
			address 127.0.0.1:6379
			key_prefix shield:test
		}
	}
}
:8080 {
	shield {
		cluster off
	}
	respond ok
}`
	adapter := caddyfile.Adapter{ServerType: httpcaddyfile.ServerType{}}
	out, warnings, err := adapter.Adapt([]byte(input), nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range warnings {
		if !strings.Contains(w.Message, "not formatted") {
			t.Fatalf("warning: %v", w)
		}
	}
	s := string(out)
	for _, want := range []string{
		`"shield":{"cluster":{"redis":{"address":"127.0.0.1:6379","key_prefix":"shield:test"}}}`,
		`"cluster":"off","handler":"shield"`,
	} {
		if !strings.Contains(s, want) {
			t.Fatalf("adapted config lacks %s:\n%s", want, s)
		}
	}
}

func TestHandlerClusterOption(t *testing.T) {
	for _, tc := range []struct {
		input, want, wantErr string
	}{
		{input: "shield {\n\tcluster off\n}", want: "off"},
		{input: "shield {\n\tcluster on\n}", want: "on"},
		{input: "shield {\n\tcluster maybe\n}", wantErr: `invalid cluster "maybe"`},
		{input: "shield {\n\tcluster on\n\tcluster off\n}", wantErr: "cluster already specified"},
		{input: "shield {\n\trule /a {\n\t\tcluster off\n\t}\n}", wantErr: "cluster belongs to the shield block"},
	} {
		var h Handler
		err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input))
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("%q: error %v, want %q", tc.input, err, tc.wantErr)
			}
			continue
		}
		if err != nil || h.Cluster != tc.want {
			t.Fatalf("%q: cluster %q, %v; want %q", tc.input, h.Cluster, err, tc.want)
		}
	}
}

func TestRedisConfigResolve(t *testing.T) {
	t.Setenv("SHIELD_TEST_REDIS_PASSWORD", "s3cret")
	cfg, key, err := (&RedisConfig{Address: "redis.internal", Password: "{env.SHIELD_TEST_REDIS_PASSWORD}"}).resolve()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.opts.Addr != "redis.internal:6379" || cfg.opts.Password != "s3cret" {
		t.Fatalf("addr %q password %q", cfg.opts.Addr, cfg.opts.Password)
	}
	if cfg.timeout != defaultClusterTimeout || cfg.fallback != "share" || cfg.prefix != defaultKeyPrefix ||
		cfg.maxL2 != defaultMaxL2Object || cfg.lease != defaultLease || cfg.opts.DialTimeout != defaultDialTimeout {
		t.Fatalf("defaults not applied: %+v", cfg)
	}
	// Nothing on the request path may retry or outlive its context.
	if cfg.opts.MaxRetries != -1 || !cfg.opts.ContextTimeoutEnabled || cfg.opts.DialerRetries != 1 {
		t.Fatalf("client options: retries %d, context timeouts %v, dial retries %d",
			cfg.opts.MaxRetries, cfg.opts.ContextTimeoutEnabled, cfg.opts.DialerRetries)
	}

	url, _, err := (&RedisConfig{Address: "rediss://user:pw@r.example:6380/3", DB: 0}).resolve()
	if err != nil {
		t.Fatal(err)
	}
	if url.opts.Addr != "r.example:6380" || url.opts.DB != 3 || url.opts.Username != "user" || url.opts.TLSConfig == nil {
		t.Fatalf("URL options: %+v", url.opts)
	}

	_, same, _ := (&RedisConfig{Address: "redis.internal", Password: "{env.SHIELD_TEST_REDIS_PASSWORD}"}).resolve()
	t.Setenv("SHIELD_TEST_REDIS_PASSWORD", "other")
	_, other, _ := (&RedisConfig{Address: "redis.internal", Password: "{env.SHIELD_TEST_REDIS_PASSWORD}"}).resolve()
	if same != key || other == key {
		t.Fatal("the pool key must follow the resolved configuration")
	}

	for _, bad := range []RedisConfig{
		{},
		{Address: "a:1", Fallback: "all"},
		{Address: "a:1", Lease: caddy.Duration(100 * time.Millisecond)},
		{Address: "a:1", Timeout: caddy.Duration(-time.Second)},
		{Address: "redis://[bad"},
	} {
		if _, _, err := bad.resolve(); err == nil {
			t.Fatalf("%+v accepted", bad)
		}
	}
}

func TestBreaker(t *testing.T) {
	var changes []bool
	b := breaker{onChange: func(open bool) { changes = append(changes, open) }}
	b.failure()
	b.failure()
	b.success() // not consecutive
	b.failure()
	b.failure()
	if !b.allow() {
		t.Fatal("opened before breakerThreshold consecutive failures")
	}
	b.failure()
	if b.allow() {
		t.Fatal("still closed after breakerThreshold consecutive failures")
	}
	b.failure()
	b.reset()
	if !b.allow() || len(changes) != 2 || !changes[0] || changes[1] {
		t.Fatalf("allow %v, changes %v", b.allow(), changes)
	}
}

func TestNotifier(t *testing.T) {
	n := newNotifier()
	a, doneA := n.subscribe("k")
	b, doneB := n.subscribe("k")
	other, doneOther := n.subscribe("x")
	n.fire("k")
	for _, ch := range []<-chan struct{}{a, b} {
		select {
		case <-ch:
		default:
			t.Fatal("a waiter was not woken")
		}
	}
	select {
	case <-other:
		t.Fatal("another key's waiter was woken")
	default:
	}
	doneA()
	doneB()
	doneOther()
	if len(n.m) != 0 {
		t.Fatalf("%d notices left", len(n.m))
	}
	n.fire("nobody") // no waiter: nothing happens
}

func TestStreamIDsAndGlobs(t *testing.T) {
	for _, tc := range []struct {
		a, b string
		less bool
	}{
		{"1-0", "1-1", true}, {"2-0", "10-0", true}, {"10-5", "10-5", false}, {"11-0", "10-9", false},
	} {
		if got := streamIDLess(tc.a, tc.b); got != tc.less {
			t.Errorf("streamIDLess(%s, %s) = %v", tc.a, tc.b, got)
		}
	}
	if got := globEscape(`a*b?[c]\d`); got != `a\*b\?\[c\]\\d` {
		t.Errorf("globEscape = %q", got)
	}
}

func TestBudgetSnapshot(t *testing.T) {
	var s budgetSnapshot
	now := time.Now()
	if got := s.tokens(10, 5, now); got != 5 {
		t.Fatalf("no snapshot yet: %v tokens, want a full bucket", got)
	}
	s.setTokens(-2, now)
	if got := s.tokens(10, 5, now.Add(500*time.Millisecond)); math.Abs(got-3) > 1e-9 {
		t.Fatalf("after 500ms at 10/s: %v tokens, want 3", got)
	}
	if s.available(10, 5, 0) {
		t.Fatal("available with a token debt")
	}
	s.setTokens(3, now)
	s.setSlots(3)
	if !s.available(10, 5, 4) || s.allowsBackground(10, 5, 4) {
		t.Fatal("3 of 4 slots: a miss may go, a refresh must leave the reserve")
	}
	if got := s.retryAfter(10, 5); got != time.Second {
		t.Fatalf("retryAfter with tokens = %s", got)
	}
}

// TestClusterBudgetShares: detached, the budget is the local one; attached,
// the local budget becomes the fallback share.
func TestClusterBudgetShares(t *testing.T) {
	b := newZoneBudget()
	b.configure(30, 5, 4)
	if lim := b.local.limiter(); lim.Limit() != 30 || lim.Burst() != 5 || b.local.limit != 4 {
		t.Fatalf("detached: %v/%d/%d", lim.Limit(), lim.Burst(), b.local.limit)
	}
	cl := &cluster{cfg: clusterConfig{fallback: "share"}, zones: map[string]*zoneCluster{}}
	cl.liveMembers.Store(3)
	b.attach(newZoneCluster(cl, "z"))
	if lim := b.local.limiter(); lim.Limit() != 10 || lim.Burst() != 1 || b.local.limit != 1 {
		t.Fatalf("share of 3: %v/%d/%d, want 10/1/1", lim.Limit(), lim.Burst(), b.local.limit)
	}
	cl.cfg.fallback = "local"
	b.applyShare()
	if lim := b.local.limiter(); lim.Limit() != 30 || lim.Burst() != 5 || b.local.limit != 4 {
		t.Fatalf("fallback local: %v/%d/%d, want the whole budget", lim.Limit(), lim.Burst(), b.local.limit)
	}
	b.attach(nil)
	if b.zc.Load() != nil {
		t.Fatal("still attached")
	}
}

// TestFallbackStartsAfterFleetReservations: switching to the local share
// empties it and waits out the fleet's reservations (a token debt).
func TestFallbackStartsAfterFleetReservations(t *testing.T) {
	cl := &cluster{cfg: clusterConfig{fallback: "share"}, zones: map[string]*zoneCluster{}}
	cl.liveMembers.Store(3)
	zc := newZoneCluster(cl, "z")
	b := newZoneBudget()
	b.configure(30, 5, 0)
	b.attach(zc)
	b.fleet.Store(true)
	zc.snap.setTokens(-9, time.Now()) // the fleet has granted 9 tokens ahead: 300ms
	local := b.fallback()
	if got := local.limiter().Tokens(); got > -2.9 {
		t.Fatalf("local tokens %v after the switch, want a debt of the fleet's reservations over 3", got)
	}
	if b.fallback() != local || b.fleet.Load() {
		t.Fatal("the second fallback must not switch again")
	}
}

// TestFallbackKeepsShareOfIdleFleet: a fleet seen idle (full bucket) a moment
// ago leaves each instance its share of the tokens, so a miss right after
// Redis fails does not wait; a fleet last seen long ago leaves none.
func TestFallbackKeepsShareOfIdleFleet(t *testing.T) {
	for _, tc := range []struct {
		name string
		seen time.Duration // how long ago the fleet's tokens were read
		want float64       // local tokens after the switch, at least
		max  float64
	}{
		{"seen just now", 0, 9, 10},
		{"seen long ago", 5 * time.Second, -1, 0.5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cl := &cluster{cfg: clusterConfig{fallback: "share"}, zones: map[string]*zoneCluster{}}
			cl.liveMembers.Store(3)
			zc := newZoneCluster(cl, "z")
			b := newZoneBudget()
			b.configure(30, 30, 0)
			b.attach(zc) // the local share: 10/s, burst 10, full
			b.fleet.Store(true)
			zc.snap.setTokens(30, time.Now().Add(-tc.seen))
			got := b.fallback().limiter().Tokens()
			if got < tc.want || got > tc.max {
				t.Fatalf("local tokens %.2f after the switch, want within [%v, %v]", got, tc.want, tc.max)
			}
		})
	}
}

// TestFailureMarkers: what an origin failure leaves in L2, and what another
// instance makes of it.
func TestFailureMarkers(t *testing.T) {
	resp := &entry{status: 503, header: http.Header{"Retry-After": {"7"}}, body: []byte("down"), responseTime: time.Now()}
	for _, tc := range []struct {
		name       string
		res        *fetchResult
		wantMarker bool
		check      func(t *testing.T, got *fetchResult)
	}{
		{"5xx answer", &fetchResult{status: 503, resp: resp}, true, func(t *testing.T, got *fetchResult) {
			if got.resp == nil || got.status != 503 || string(got.resp.body) != "down" || got.resp.header.Get("Retry-After") != "7" {
				t.Fatalf("shared answer %+v", got.resp)
			}
		}},
		{"timeout", &fetchResult{err: errOriginTimeout}, true, func(t *testing.T, got *fetchResult) {
			if !errors.Is(got.err, errOriginTimeout) {
				t.Fatalf("err %v, want the origin timeout", got.err)
			}
		}},
		{"connection error", &fetchResult{err: errors.New("dial tcp: refused")}, true, func(t *testing.T, got *fetchResult) {
			if got.err == nil || !got.failed() {
				t.Fatalf("want a failure, got %+v", got)
			}
		}},
		{"budget refusal is no failure", &fetchResult{err: errOriginBudget}, false, nil},
		{"too large is no failure", &fetchResult{err: errTooLarge}, false, nil},
		{"a 404 is an answer", &fetchResult{status: 404, resp: resp}, false, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, ok := failureMarker(tc.res, 1<<20)
			if ok != tc.wantMarker {
				t.Fatalf("marker %q (%v), want one: %v", m, ok, tc.wantMarker)
			}
			if !ok {
				return
			}
			got := &fetchResult{}
			shareFailure(got, strings.TrimPrefix(m, "f:"))
			if !got.failed() || !got.shareable || got.cluster != clusterL2Marker {
				t.Fatalf("shared result %+v: want a shareable failure from L2", got)
			}
			tc.check(t, got)
		})
	}
	// A 5xx answer too large to keep in L2 is shared as its status.
	big := &entry{status: 502, header: http.Header{}, body: make([]byte, 100<<10), responseTime: time.Now()}
	m, _ := failureMarker(&fetchResult{status: 502, resp: big}, 1<<20)
	got := &fetchResult{}
	shareFailure(got, strings.TrimPrefix(m, "f:"))
	if m != "f:s:502" || got.status != 502 || got.err == nil {
		t.Fatalf("large 5xx: marker %q, shared %+v", m, got)
	}
}

// TestUnservingReplies: error replies that mean Redis cannot serve count as failures.
func TestUnservingReplies(t *testing.T) {
	for msg, want := range map[string]bool{
		"OOM command not allowed when used memory > 'maxmemory'.":  true,
		"READONLY You can't write against a read only replica.":    true,
		"WRONGPASS invalid username-password pair":                 true,
		"NOAUTH Authentication required.":                          true,
		"ERR unknown command":                                      false,
		"WRONGTYPE Operation against a key holding the wrong kind": false,
	} {
		if got := unservingReply(errors.New(msg)); got != want {
			t.Errorf("%q: %v, want %v", msg, got, want)
		}
	}
}

func TestLocalGrantsOwed(t *testing.T) {
	var g localGrants
	a := g.add()
	g.add()
	g.remove(a)
	if n := g.take(); n != 1 {
		t.Fatalf("owed %d, want 1", n)
	}
	if n := g.take(); n != 0 {
		t.Fatalf("owed %d after take, want 0", n)
	}
}

func TestBudgetWait(t *testing.T) {
	zc := &zoneCluster{}
	if got := zc.budgetWait(time.Second); got != 750*time.Millisecond {
		t.Fatalf("budgetWait(1s) = %s, want 750ms", got)
	}
	zc.observeFetch(400 * time.Millisecond)
	if got := zc.budgetWait(time.Second); got != 200*time.Millisecond {
		t.Fatalf("with 400ms fetches: %s, want 200ms", got)
	}
	if got := zc.budgetWait(100 * time.Millisecond); got != 0 {
		t.Fatalf("no time left for the fetch: %s, want 0", got)
	}
}

func TestProvisionClusterWithoutApp(t *testing.T) {
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	h := &Handler{Zone: "cluster-test-none", Cluster: "on"}
	if err := h.Provision(ctx); err == nil || !strings.Contains(err.Error(), "no cluster is configured") {
		t.Fatalf("cluster on without a configured cluster: %v", err)
	}
	_ = h.Cleanup()
	h = &Handler{Zone: "cluster-test-none"}
	if err := h.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	defer h.Cleanup()
	if h.zone.clusterOf() != nil || h.zone.clusterStats() != nil {
		t.Fatal("a zone without a cluster joined one")
	}
}

package caddymodule

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"
)

func init() {
	caddy.RegisterModule(App{})
	httpcaddyfile.RegisterGlobalOption("shield", parseShieldOption)
}

// Defaults of the cluster options.
const (
	defaultClusterTimeout = 50 * time.Millisecond
	defaultDialTimeout    = time.Second
	defaultKeyPrefix      = "shield"
	defaultMaxL2Object    = 1 << 20
	defaultLease          = 3 * time.Second
)

// App is the `shield` app: the process-wide part of Shield, configured by
// the `shield` global option. Its cluster makes every Caddy that shares a
// Redis and a key prefix one cache: a shared second tier (L2) behind each
// instance's memory (L1), one fetch per key for the whole fleet, one origin
// budget, and purges that reach every instance.
type App struct {
	// Cluster joins this instance to a fleet. Default: none (every instance on its own).
	Cluster *ClusterConfig `json:"cluster,omitempty"`

	cluster *cluster
	poolKey string // set once the cluster was acquired; Cleanup releases only this
}

// ClusterConfig chooses the engine the fleet runs on; Redis is the one there is.
type ClusterConfig struct {
	Redis *RedisConfig `json:"redis,omitempty"`
}

// RedisConfig is the Redis a fleet shares.
type RedisConfig struct {
	// Address is host:port, or a redis:// or rediss:// (TLS) URL, which may
	// carry the username, password and database.
	Address string `json:"address,omitempty"`
	// KeyPrefix starts every key Shield uses; instances sharing it form one
	// cluster. Default: "shield".
	KeyPrefix string `json:"key_prefix,omitempty"`
	// Timeout bounds every Redis call on the request path; a call cut by it
	// counts as a failure for the circuit breaker. Default: 50ms.
	Timeout caddy.Duration `json:"timeout,omitempty"`
	// Fallback is the origin budget while Redis is unreachable: "share"
	// (default) gives each instance origin_rate, origin_burst and
	// origin_concurrency divided by the number of live instances last seen;
	// "local" gives each instance all of it.
	Fallback string `json:"fallback,omitempty"`
	// DB is the Redis database number. Default: 0 (or the URL's).
	DB int `json:"db,omitempty"`
	// Username and Password authenticate (ACL or requirepass); Caddy
	// placeholders such as {env.REDIS_PASSWORD} are resolved at load.
	Username string `json:"username,omitempty"`
	Password string `json:"password,omitempty"`
	// TLS connects with TLS (implied by a rediss:// address).
	TLS *RedisTLS `json:"tls,omitempty"`
	// PoolSize is the most connections to Redis. Default: 10 per CPU.
	PoolSize int `json:"pool_size,omitempty"`
	// DialTimeout bounds connecting to Redis outside the request path
	// (startup, probes); on the request path Timeout applies. Default: 1s.
	DialTimeout caddy.Duration `json:"dial_timeout,omitempty"`
	// MaxL2ObjectSize is the largest encoded entry stored in Redis, in bytes;
	// larger ones stay in the fetching instance's memory, and a marker tells
	// the others to fetch their own copy rather than wait. Default: 1MiB.
	MaxL2ObjectSize int64 `json:"max_l2_object_size,omitempty"`
	// Lease is how long a fetch lock or an origin slot outlives an instance
	// that stopped renewing it (renewed every third of it): after a crash,
	// another instance takes over the fetch within about this long. Default: 3s.
	Lease caddy.Duration `json:"lease,omitempty"`
}

// RedisTLS configures TLS to Redis.
type RedisTLS struct {
	// ServerName overrides the name verified in Redis's certificate.
	ServerName string `json:"server_name,omitempty"`
	// CAFile is a PEM file of the roots that sign Redis's certificate. Default: the system's.
	CAFile string `json:"ca_file,omitempty"`
	// InsecureSkipVerify does not verify Redis's certificate (testing only).
	InsecureSkipVerify bool `json:"insecure_skip_verify,omitempty"`
}

// CaddyModule returns the Caddy module information.
func (App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "shield",
		New: func() caddy.Module { return new(App) },
	}
}

// Provision resolves the cluster configuration and acquires its connection,
// shared with the previous config when it is the same.
func (a *App) Provision(ctx caddy.Context) error {
	if a.Cluster == nil {
		return nil
	}
	if a.Cluster.Redis == nil {
		return fmt.Errorf("cluster: no engine configured (want redis)")
	}
	if err := registerClusterMetrics(ctx); err != nil {
		return fmt.Errorf("registering cluster metrics: %w", err)
	}
	cfg, key, err := a.Cluster.Redis.resolve()
	if err != nil {
		return fmt.Errorf("cluster redis: %w", err)
	}
	logger := ctx.Logger()
	val, _, err := clusters.LoadOrNew(key, func() (caddy.Destructor, error) {
		return newCluster(cfg, logger)
	})
	if err != nil {
		return fmt.Errorf("cluster redis: %w", err)
	}
	a.cluster, a.poolKey = val.(*cluster), key
	a.cluster.logger.Store(logger)
	return nil
}

// Start is a no-op: the cluster's loops run from Provision, like the zones'.
func (a *App) Start() error { return nil }

// Stop is a no-op: Cleanup releases the cluster.
func (a *App) Stop() error { return nil }

// Cleanup releases the cluster; the last config to let go of it closes it.
func (a *App) Cleanup() error {
	if a.poolKey == "" {
		return nil
	}
	_, err := clusters.Delete(a.poolKey)
	a.poolKey = ""
	return err
}

// resolve checks the options, resolves placeholders and makes the client
// options. key identifies the resulting connection in clusters.
func (rc *RedisConfig) resolve() (clusterConfig, string, error) {
	repl := caddy.NewReplacer()
	cfg := clusterConfig{
		prefix:   rc.KeyPrefix,
		timeout:  time.Duration(rc.Timeout),
		fallback: rc.Fallback,
		maxL2:    rc.MaxL2ObjectSize,
		lease:    time.Duration(rc.Lease),
	}
	if cfg.prefix == "" {
		cfg.prefix = defaultKeyPrefix
	}
	if cfg.timeout == 0 {
		cfg.timeout = defaultClusterTimeout
	}
	if cfg.fallback == "" {
		cfg.fallback = "share"
	}
	if cfg.maxL2 == 0 {
		cfg.maxL2 = defaultMaxL2Object
	}
	if cfg.lease == 0 {
		cfg.lease = defaultLease
	}
	switch {
	case cfg.timeout < 0:
		return cfg, "", fmt.Errorf("timeout must be positive")
	case cfg.fallback != "share" && cfg.fallback != "local":
		return cfg, "", fmt.Errorf("fallback must be share or local, not %q", cfg.fallback)
	case cfg.maxL2 < 0:
		return cfg, "", fmt.Errorf("max_l2_object_size cannot be negative")
	case cfg.lease < 300*time.Millisecond:
		return cfg, "", fmt.Errorf("lease must be at least 300ms")
	case rc.DB < 0 || rc.PoolSize < 0 || rc.DialTimeout < 0:
		return cfg, "", fmt.Errorf("db, pool_size and dial_timeout cannot be negative")
	}

	addr := strings.TrimSpace(repl.ReplaceKnown(rc.Address, ""))
	if addr == "" {
		return cfg, "", fmt.Errorf("address is required")
	}
	var opts *redis.Options
	if strings.Contains(addr, "://") {
		var err error
		if opts, err = redis.ParseURL(addr); err != nil {
			return cfg, "", fmt.Errorf("invalid address: %v", err)
		}
	} else {
		if _, _, err := net.SplitHostPort(addr); err != nil {
			addr = net.JoinHostPort(addr, "6379")
		}
		opts = &redis.Options{Addr: addr}
	}
	cfg.address = opts.Addr
	if rc.DB != 0 {
		opts.DB = rc.DB
	}
	if rc.Username != "" {
		opts.Username = repl.ReplaceKnown(rc.Username, "")
	}
	if rc.Password != "" {
		opts.Password = repl.ReplaceKnown(rc.Password, "")
	}
	if rc.TLS != nil {
		tc, err := rc.TLS.config(opts)
		if err != nil {
			return cfg, "", err
		}
		opts.TLSConfig = tc
	}
	if rc.PoolSize > 0 {
		opts.PoolSize = rc.PoolSize
	}
	opts.DialTimeout = time.Duration(rc.DialTimeout)
	if opts.DialTimeout == 0 {
		opts.DialTimeout = defaultDialTimeout
	}
	// Redis must never stall a request: no retries (a retry doubles the wait),
	// a single dial attempt, deadlines from each call's context (the request
	// path's are cfg.timeout), and generous socket timeouts for the rest.
	opts.MaxRetries = -1
	opts.DialerRetries = 1
	opts.ContextTimeoutEnabled = true
	opts.ReadTimeout = 10 * time.Second
	opts.WriteTimeout = 10 * time.Second
	opts.PoolTimeout = time.Second
	opts.Protocol = 2
	opts.DisableIdentity = true
	opts.MaintNotificationsConfig = &maintnotifications.Config{Mode: maintnotifications.ModeDisabled}
	cfg.opts = opts

	// The key is everything that makes the connection, credentials included
	// (hashed: it is only an identity).
	ident, _ := json.Marshal([]any{opts.Network, opts.Addr, opts.DB, opts.Username, opts.Password,
		opts.TLSConfig != nil, rc.TLS, opts.PoolSize, opts.DialTimeout, cfg.prefix, cfg.timeout,
		cfg.fallback, cfg.maxL2, cfg.lease})
	sum := sha256.Sum256(ident)
	return cfg, hex.EncodeToString(sum[:]), nil
}

func (t *RedisTLS) config(opts *redis.Options) (*tls.Config, error) {
	tc := opts.TLSConfig
	if tc == nil {
		host, _, _ := net.SplitHostPort(opts.Addr)
		tc = &tls.Config{ServerName: host, MinVersion: tls.VersionTLS12}
	}
	if t.ServerName != "" {
		tc.ServerName = t.ServerName
	}
	tc.InsecureSkipVerify = t.InsecureSkipVerify
	if t.CAFile != "" {
		pem, err := os.ReadFile(t.CAFile)
		if err != nil {
			return nil, fmt.Errorf("tls ca_file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("tls ca_file %q: no certificate found", t.CAFile)
		}
		tc.RootCAs = pool
	}
	return tc, nil
}

// parseShieldOption reads the `shield` global option:
//
//	{
//	    shield {
//	        cluster redis {
//	            address <host:port | redis://... | rediss://...>
//	            key_prefix <prefix>
//	            timeout <duration>
//	            fallback share|local
//	            db <n>
//	            username <name>
//	            password <password>
//	            tls {
//	                server_name <name>
//	                ca_file <pem file>
//	                insecure_skip_verify
//	            }
//	            pool_size <n>
//	            dial_timeout <duration>
//	            max_l2_object_size <size>
//	            lease <duration>
//	        }
//	    }
//	}
func parseShieldOption(d *caddyfile.Dispenser, existing any) (any, error) {
	d.Next() // the option's name
	if existing != nil {
		return nil, d.Err("shield global option already specified")
	}
	app := new(App)
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	for d.NextBlock(0) {
		switch d.Val() {
		case "cluster":
			if app.Cluster != nil {
				return nil, d.Err("cluster already specified")
			}
			if !d.NextArg() {
				return nil, d.ArgErr()
			}
			if d.Val() != "redis" {
				return nil, d.Errf("unsupported cluster engine %q (want redis)", d.Val())
			}
			if d.NextArg() {
				return nil, d.ArgErr()
			}
			rc, err := parseRedisBlock(d)
			if err != nil {
				return nil, err
			}
			app.Cluster = &ClusterConfig{Redis: rc}
		default:
			return nil, d.Errf("unrecognized shield option %q", d.Val())
		}
	}
	return httpcaddyfile.App{Name: "shield", Value: caddyconfig.JSON(app, nil)}, nil
}

func parseRedisBlock(d *caddyfile.Dispenser) (*RedisConfig, error) {
	rc := new(RedisConfig)
	seen := map[string]bool{}
	var addressAt, leaseAt srcPos
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		if seen[name] {
			return nil, d.Errf("%s already specified", name)
		}
		seen[name] = true
		var err error
		switch name {
		case "address":
			addressAt = posOf(d)
			rc.Address, err = oneArg(d)
		case "key_prefix":
			rc.KeyPrefix, err = oneArg(d)
		case "timeout", "dial_timeout", "lease":
			if name == "lease" {
				leaseAt = posOf(d)
			}
			var dur *caddy.Duration
			if dur, err = durationArg(d); err == nil {
				if *dur == 0 {
					return nil, d.Errf("%s must be positive", name)
				}
				switch name {
				case "timeout":
					rc.Timeout = *dur
				case "dial_timeout":
					rc.DialTimeout = *dur
				default:
					rc.Lease = *dur
				}
			}
		case "fallback":
			rc.Fallback, err = choiceArg(d, "share", "local")
		case "db":
			var v string
			if v, err = oneArg(d); err == nil {
				if rc.DB, err = strconv.Atoi(v); err != nil || rc.DB < 0 {
					return nil, d.Errf("invalid db %q: want a database number", v)
				}
			}
		case "username":
			rc.Username, err = oneArg(d)
		case "password":
			rc.Password, err = oneArg(d)
		case "pool_size":
			rc.PoolSize, err = positiveIntArg(d)
		case "max_l2_object_size":
			rc.MaxL2ObjectSize, err = sizeArg(d)
		case "tls":
			rc.TLS, err = parseRedisTLS(d)
		default:
			return nil, d.Errf("unrecognized cluster redis option %q", name)
		}
		if err != nil {
			return nil, err
		}
	}
	if rc.Address == "" {
		return nil, d.Err("cluster redis needs an address")
	}
	// What resolve would refuse, refused here with the line, unless
	// placeholders leave it to load time.
	if strings.Contains(rc.Address, "://") && !strings.Contains(rc.Address, "{") {
		if _, err := redis.ParseURL(rc.Address); err != nil {
			return nil, addressAt.errf("invalid cluster redis address: %v", err)
		}
	}
	if rc.Lease != 0 && time.Duration(rc.Lease) < 300*time.Millisecond {
		return nil, leaseAt.errf("lease must be at least 300ms")
	}
	return rc, nil
}

// parseRedisTLS reads `tls` alone or with a block.
func parseRedisTLS(d *caddyfile.Dispenser) (*RedisTLS, error) {
	t := new(RedisTLS)
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		var err error
		switch d.Val() {
		case "server_name":
			t.ServerName, err = oneArg(d)
		case "ca_file":
			t.CAFile, err = oneArg(d)
		case "insecure_skip_verify":
			if d.NextArg() {
				return nil, d.ArgErr()
			}
			t.InsecureSkipVerify = true
		default:
			return nil, d.Errf("unrecognized tls option %q", d.Val())
		}
		if err != nil {
			return nil, err
		}
	}
	return t, nil
}

// clusterClaims records, per config load, whether each zone's blocks use
// the cluster, so that two blocks of one zone cannot disagree.
var (
	clusterClaimsMu sync.Mutex
	clusterClaims   = map[any]map[string]bool{}
)

func claimClusterMode(ctx caddy.Context, zone string, on bool) error {
	id := any(ctx.GetMetricsRegistry())
	clusterClaimsMu.Lock()
	defer clusterClaimsMu.Unlock()
	m, ok := clusterClaims[id]
	if !ok {
		m = map[string]bool{}
		clusterClaims[id] = m
		context.AfterFunc(ctx, func() {
			clusterClaimsMu.Lock()
			delete(clusterClaims, id)
			clusterClaimsMu.Unlock()
		})
	}
	if prev, ok := m[zone]; ok && prev != on {
		return fmt.Errorf("zone %q is declared with cluster on and off", zone)
	}
	m[zone] = on
	return nil
}

// provisionCluster attaches the handler's zone to the cluster of the
// `shield` app (cluster on, the default when one is configured) or detaches
// it (cluster off, or none configured). Called last in Provision.
func (h *Handler) provisionCluster(ctx caddy.Context) error {
	var cl *cluster
	switch h.Cluster {
	case "", "on":
		app, err := ctx.AppIfConfigured("shield")
		if err != nil && !errors.Is(err, caddy.ErrNotConfigured) {
			return err
		}
		if a, ok := app.(*App); ok {
			cl = a.cluster
		}
		if cl == nil && h.Cluster == "on" {
			return fmt.Errorf("cluster on, but no cluster is configured (global option: shield { cluster redis { ... } })")
		}
	case "off":
	default:
		return fmt.Errorf("cluster must be on or off, not %q", h.Cluster)
	}
	if err := claimClusterMode(ctx, h.Zone, cl != nil); err != nil {
		return err
	}
	b, ok := h.zone.budget.(*clusterBudget)
	if !ok {
		return fmt.Errorf("zone %q: budget cannot join a cluster", h.Zone)
	}
	if cl == nil {
		b.attach(nil)
		return nil
	}
	b.attach(cl.zone(h.Zone))
	return nil
}

// zoneCluster is a zone's part of a cluster: its Redis keys, its budget
// snapshot and counters. Made once per cluster and zone name.
type zoneCluster struct {
	cl   *cluster
	name string

	// Key prefixes (+ an L1 key) and keys, under <prefix>:z:<zone>:
	recPrefix, lockPrefix, markPrefix, tagPrefix, varPrefix string
	gcraKey, slotsKey                                       string

	budget        atomic.Pointer[clusterBudget] // the zone's budget, for share updates
	snap          budgetSnapshot
	fleetInFlight atomic.Int64 // this instance's fetches holding a fleet grant
	fetchTime     atomic.Int64 // moving average of this zone's origin fetches (ns), for budget waits
	metrics       *zoneClusterMetrics
}

func newZoneCluster(cl *cluster, name string) *zoneCluster {
	base := cl.key("z", name) + ":"
	return &zoneCluster{
		cl:         cl,
		name:       name,
		recPrefix:  base + "e:",
		lockPrefix: base + "l:",
		markPrefix: base + "m:",
		tagPrefix:  base + "t:",
		varPrefix:  base + "v:",
		gcraKey:    base + "gcra",
		slotsKey:   base + "slots",
		metrics:    newZoneClusterMetrics(name),
	}
}

// clusterOf returns the zone's cluster state, or nil when it is not in cluster mode.
func (z *zone) clusterOf() *zoneCluster {
	if b, ok := z.budget.(*clusterBudget); ok {
		return b.zc.Load()
	}
	return nil
}

// clusterNote says how the cluster took part in a fetch result.
type clusterNote uint8

const (
	clusterNone     clusterNote = iota
	clusterL2Hit                // the entry came from L2, not from the origin
	clusterL2Marker             // L2 said the URL is not storable: nothing was fetched here
	clusterDegraded             // fetched without the cluster: Redis was unreachable
	clusterL2Stale              // a stale entry from L2, within its stale-while-revalidate window
)

// fromL2 says nothing was fetched: settle has nothing to store.
func (n clusterNote) fromL2() bool {
	return n == clusterL2Hit || n == clusterL2Marker || n == clusterL2Stale
}

// clusterState is the cluster in GET /shield/stats.
type clusterState struct {
	State         string       `json:"state"` // ok or degraded
	DegradedSince *time.Time   `json:"degraded_since,omitempty"`
	Address       string       `json:"address"`
	KeyPrefix     string       `json:"key_prefix"`
	Fallback      string       `json:"fallback"`
	Member        string       `json:"member"`
	Members       []memberInfo `json:"members"`
	BudgetShare   int          `json:"budget_share_divisor"` // N in budget/N while degraded
	RedisErrors   uint64       `json:"redis_errors"`
	LastError     string       `json:"last_error,omitempty"` // the last Redis failure seen
}

// zoneClusterStats is a zone's cluster counters in GET /shield/stats.
type zoneClusterStats struct {
	L2Hits        uint64   `json:"l2_hits"`
	L2Misses      uint64   `json:"l2_misses"` // fetched here, holding the fleet lock
	LockWaits     uint64   `json:"lock_waits"`
	Takeovers     uint64   `json:"lock_takeovers"`
	L2Writes      uint64   `json:"l2_writes"`
	Degraded      uint64   `json:"degraded_fetches"`
	Fallbacks     uint64   `json:"budget_fallbacks"`
	FleetTokens   *float64 `json:"fleet_tokens"` // last seen; null when the rate is unlimited
	FleetSlots    int      `json:"fleet_slots_in_use"`
	FleetInFlight int64    `json:"fleet_in_flight"`
}

// clusterStats describes the newest cluster in use, or nil.
func clusterStats() *clusterState {
	var cl *cluster
	for _, z := range liveZones() {
		if zc := z.clusterOf(); zc != nil {
			cl = zc.cl
		}
	}
	if cl == nil {
		return nil
	}
	s := &clusterState{
		State: "ok", Address: cl.cfg.address, KeyPrefix: cl.cfg.prefix, Fallback: cl.cfg.fallback,
		Member: cl.id, Members: cl.members(), BudgetShare: cl.shareDivisor(), RedisErrors: cl.redisErrors.Load(),
		LastError: cl.lastError(),
	}
	if !cl.healthy() {
		s.State = "degraded"
		cl.mu.Lock()
		since := cl.degradedAt
		cl.mu.Unlock()
		if !since.IsZero() {
			s.DegradedSince = &since
		}
	}
	if s.Members == nil {
		s.Members = []memberInfo{}
	}
	return s
}

// clusterStats describes the zone's part in the cluster, or nil.
func (z *zone) clusterStats() *zoneClusterStats {
	zc := z.clusterOf()
	if zc == nil {
		return nil
	}
	m := zc.metrics
	s := &zoneClusterStats{
		L2Hits: m.l2Hits.Load(), L2Misses: m.l2Misses.Load(), LockWaits: m.lockWaits.Load(),
		Takeovers: m.takeovers.Load(), L2Writes: m.l2Writes.Load(), Degraded: m.degraded.Load(),
		Fallbacks: m.fallbackCount.Load(), FleetSlots: zc.snap.slotsInUse(), FleetInFlight: zc.fleetInFlight.Load(),
	}
	if b := zc.budget.Load(); b != nil {
		if perSecond, burst, _ := b.numbers(); perSecond > 0 {
			t := zc.snap.tokens(perSecond, burst, time.Now())
			s.FleetTokens = &t
		}
	}
	return s
}

// Interface guards
var (
	_ caddy.App          = (*App)(nil)
	_ caddy.Provisioner  = (*App)(nil)
	_ caddy.CleanerUpper = (*App)(nil)
)

package caddymodule

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// clusters holds the process's Redis connections, keyed by their resolved
// configuration, so that a reload with the same cluster keeps its connection,
// membership and breaker state: the new config acquires before the old one releases.
var clusters = caddy.NewUsagePool()

// errClusterDown is returned without calling Redis while the breaker is open.
var errClusterDown = errors.New("cluster degraded: redis unreachable")

const (
	// breakerThreshold consecutive Redis failures open the breaker: from then
	// on the request path makes no Redis call until a background probe succeeds.
	breakerThreshold = 3
	// probeInterval spaces the probes of an open breaker (the half-open state).
	probeInterval = 250 * time.Millisecond
	// heartbeatInterval refreshes this instance's membership; a member is live
	// for memberTTL after its last heartbeat.
	heartbeatInterval = time.Second
	memberTTL         = 3 * time.Second
	// purgeBlock is how long one XREAD of the purge stream blocks.
	purgeBlock = 500 * time.Millisecond
)

// clusterConfig is a cluster's configuration with placeholders resolved.
type clusterConfig struct {
	opts     *redis.Options
	address  string // for stats and logs, without credentials
	prefix   string
	timeout  time.Duration
	fallback string // "share" or "local"
	maxL2    int64
	lease    time.Duration
}

// cluster is one Redis-backed fleet as this process sees it: the connection,
// a circuit breaker in front of it, this instance's membership and the
// background loops (heartbeat and probe, lease renewal, lock-release
// notifications, the purge stream). It is shared by every zone in cluster mode.
type cluster struct {
	cfg     clusterConfig
	rdb     *redis.Client
	id      string // this instance's member id, new for each process
	name    string // host and pid, for stats
	breaker breaker
	notify  *notifier
	renew   *renewer
	logger  atomic.Pointer[zap.Logger]

	mu          sync.Mutex // guards zones, memberList, pending, degradedAt, fewerSince
	zones       map[string]*zoneCluster
	memberList  []memberInfo
	pending     []purgeMessage // purges made while degraded, sent on rejoin
	degradedAt  time.Time
	fewerSince  time.Time    // since when heartbeats have seen fewer members than liveMembers
	liveMembers atomic.Int64 // members seen at the last heartbeat (at least 1)
	rejoined    atomic.Int64 // when the breaker last closed (unix ns)
	redisErrors atomic.Uint64
	lastErr     atomic.Value // string: the last Redis failure, for logs and stats

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// memberInfo is one live instance, as /shield/stats shows it.
type memberInfo struct {
	ID   string `json:"id"`
	Name string `json:"name"`
	Self bool   `json:"self,omitempty"`
}

// redisLogger sends the client's own messages (failed dials while Redis is
// down, reconnections) to Caddy's log at debug level: the cluster logs its
// state changes itself, once.
type redisLogger struct{}

func (redisLogger) Printf(_ context.Context, format string, v ...any) {
	if ce := caddy.Log().Named("shield.redis").Check(zapcore.DebugLevel, fmt.Sprintf(format, v...)); ce != nil {
		ce.Write()
	}
}

var setRedisLogger sync.Once

func newCluster(cfg clusterConfig, logger *zap.Logger) (*cluster, error) {
	setRedisLogger.Do(func() { redis.SetLogger(redisLogger{}) })
	host, _ := os.Hostname()
	c := &cluster{
		cfg:    cfg,
		rdb:    redis.NewClient(cfg.opts),
		id:     randomToken(8),
		name:   fmt.Sprintf("%s/%d", host, os.Getpid()),
		notify: newNotifier(),
		renew:  newRenewer(),
		zones:  make(map[string]*zoneCluster),
	}
	c.logger.Store(logger)
	c.liveMembers.Store(1)
	c.breaker.onChange = c.breakerChanged
	c.ctx, c.cancel = context.WithCancel(context.Background())

	// Redis down at startup must not stop Caddy from serving: start degraded
	// and let the probe join the cluster when Redis answers.
	ctx, cancel := context.WithTimeout(c.ctx, min(cfg.opts.DialTimeout, time.Second))
	err := c.heartbeat(ctx)
	cancel()
	if err != nil {
		c.breaker.trip()
		logger.Warn("cluster: redis unreachable at startup; serving from the local cache with the fallback budget",
			zap.String("address", cfg.address), zap.Error(err))
	} else {
		logger.Info("cluster: joined", zap.String("address", cfg.address), zap.String("key_prefix", cfg.prefix),
			zap.String("member", c.id), zap.Int64("members", c.liveMembers.Load()))
	}
	c.wg.Add(4)
	go c.heartbeatLoop()
	go c.renewLoop()
	go c.listen()
	go c.consumePurges()
	return c, nil
}

// Destruct implements caddy.Destructor: the last config using the cluster is gone.
func (c *cluster) Destruct() error {
	ctx, cancel := context.WithTimeout(context.Background(), c.cfg.timeout+100*time.Millisecond)
	_ = c.rdb.ZRem(ctx, c.key("members"), c.id).Err() // leave at once rather than after memberTTL
	cancel()
	c.cancel()
	c.wg.Wait()
	return c.rdb.Close()
}

func (c *cluster) log() *zap.Logger { return c.logger.Load() }

// key names a cluster-wide key.
func (c *cluster) key(parts ...string) string {
	k := c.cfg.prefix
	for _, p := range parts {
		k += ":" + p
	}
	return k
}

// healthy says whether the request path may call Redis now.
func (c *cluster) healthy() bool { return c.breaker.allow() }

// rejoinGrace is how long an instance keeps its local budget share after
// Redis returns: the others rejoin within a probe interval or two, and until
// they do, they grant from their shares (rejoinBudget).
const rejoinGrace = 2 * probeInterval

// fleetBudgetReady says whether origin budget decisions go to the fleet now:
// Redis is reachable, and not just back (rejoinGrace).
func (c *cluster) fleetBudgetReady() bool {
	return c.healthy() && time.Since(time.Unix(0, c.rejoined.Load())) >= rejoinGrace
}

// call runs one Redis operation for the request path: skipped while the
// breaker is open, cut at the configured timeout, never retried (MaxRetries -1).
// op must not touch what it writes once call has returned an error.
func (c *cluster) call(ctx context.Context, op func(ctx context.Context) error) error {
	return c.callTimeout(ctx, c.cfg.timeout, op)
}

// callTimeout is call with another bound, for admin and background work.
//
// The client honours context deadlines on the socket, but a call that must
// first dial and handshake a hung server can take up to twice its deadline:
// so the call runs aside and is abandoned at the deadline, its goroutine
// ending on its own moments later. The request path waits the timeout, never more.
func (c *cluster) callTimeout(ctx context.Context, d time.Duration, op func(ctx context.Context) error) error {
	if !c.breaker.allow() {
		return errClusterDown
	}
	start := time.Now()
	cctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	defer func() { clusterRedisSeconds.Observe(time.Since(start).Seconds()) }()
	done := make(chan error, 1)
	go func() { done <- op(cctx) }()
	var err error
	select {
	case err = <-done:
	case <-cctx.Done():
		err = cctx.Err()
	}
	if err != nil && ctx.Err() != nil {
		return ctx.Err() // the caller gave up: says nothing about Redis
	}
	c.observe(err)
	return err
}

// observe feeds a call's outcome to the breaker. An error reply means Redis
// is up and answering; only timeouts and connection errors count.
func (c *cluster) observe(err error) {
	var reply redis.Error
	if err == nil || errors.Is(err, redis.Nil) ||
		(errors.As(err, &reply) && !errors.Is(err, context.DeadlineExceeded) && !unservingReply(err)) {
		c.breaker.success()
		return
	}
	c.redisErrors.Add(1)
	clusterRedisErrors.Inc()
	c.lastErr.Store(err.Error())
	c.breaker.failure()
}

// unservingReply says whether an error reply means this Redis cannot serve
// the cluster now (full, read-only, loading, failing over, refusing our
// credentials), which counts as a failure like a timeout: the fleet falls
// back rather than have every fetch fail its Redis step.
func unservingReply(err error) bool {
	msg := err.Error()
	for _, prefix := range []string{"OOM", "READONLY", "MISCONF", "LOADING", "MASTERDOWN", "CLUSTERDOWN",
		"TRYAGAIN", "BUSY", "NOAUTH", "WRONGPASS", "NOPERM", "NOREPLICAS"} {
		if strings.HasPrefix(msg, prefix) {
			return true
		}
	}
	return false
}

// isRedisFailure tells a failed Redis call from an answer (including redis.Nil).
func isRedisFailure(err error) bool {
	return err != nil && !errors.Is(err, redis.Nil)
}

// breakerChanged logs and reacts to the breaker opening and closing.
func (c *cluster) breakerChanged(open bool) {
	c.mu.Lock()
	if open {
		c.degradedAt = time.Now()
	} else {
		c.degradedAt = time.Time{}
	}
	zcs := c.zoneList()
	c.mu.Unlock()
	if open {
		c.log().Warn("cluster degraded: redis unreachable or unable to serve; serving from the local cache with the fallback budget",
			zap.String("address", c.cfg.address), zap.String("fallback", c.cfg.fallback),
			zap.Int64("members", c.liveMembers.Load()), zap.String("last_error", c.lastError()))
	} else {
		c.log().Info("cluster rejoined", zap.String("address", c.cfg.address))
	}
	for _, zc := range zcs {
		if b := zc.budget.Load(); b != nil {
			b.applyShare()
		}
	}
}

// lastError is the last Redis failure seen, "" when none.
func (c *cluster) lastError() string {
	v, _ := c.lastErr.Load().(string)
	return v
}

// zoneList returns the attached zones; c.mu must be held.
func (c *cluster) zoneList() []*zoneCluster {
	out := make([]*zoneCluster, 0, len(c.zones))
	for _, zc := range c.zones {
		out = append(out, zc)
	}
	return out
}

// zone returns the cluster state of a zone name, made once per cluster.
func (c *cluster) zone(name string) *zoneCluster {
	c.mu.Lock()
	defer c.mu.Unlock()
	zc, ok := c.zones[name]
	if !ok {
		zc = newZoneCluster(c, name)
		c.zones[name] = zc
	}
	return zc
}

// shareDivisor is N in the fallback budget/N: the live members last seen
// (fallback share), or 1 (fallback local: each instance keeps the whole budget).
func (c *cluster) shareDivisor() int {
	if c.cfg.fallback == "local" {
		return 1
	}
	return int(max(1, c.liveMembers.Load()))
}

// heartbeatLoop keeps this instance's membership alive and, while the breaker
// is open, probes Redis (the half-open state) and rejoins when it answers.
func (c *cluster) heartbeatLoop() {
	defer c.wg.Done()
	t := time.NewTimer(heartbeatInterval)
	defer t.Stop()
	for {
		select {
		case <-c.ctx.Done():
			return
		case <-t.C:
		}
		if c.breaker.allow() {
			ctx, cancel := context.WithTimeout(c.ctx, max(c.cfg.timeout, 250*time.Millisecond))
			err := c.heartbeat(ctx)
			if err == nil {
				// Fetches granted by the local share after a Redis call failed
				// while the breaker stayed closed: charged to the fleet now.
				c.mu.Lock()
				zcs := c.zoneList()
				c.mu.Unlock()
				for _, zc := range zcs {
					_ = zc.chargeOwed(ctx)
				}
			} else if c.ctx.Err() == nil {
				c.observe(err)
			}
			cancel()
			t.Reset(heartbeatInterval)
			continue
		}
		c.probe()
		t.Reset(probeInterval)
	}
}

// probe checks an unreachable Redis; when it answers, the zones' fleet
// budgets start empty (local shares were spent meanwhile), purges made while
// degraded are sent, and the breaker closes.
func (c *cluster) probe() {
	ctx, cancel := context.WithTimeout(c.ctx, max(c.cfg.timeout, 250*time.Millisecond))
	defer cancel()
	if err := c.rdb.Ping(ctx).Err(); err != nil {
		c.lastErr.Store(err.Error()) // for stats: why the cluster stays degraded
		return
	}
	if err := c.heartbeat(ctx); err != nil {
		return
	}
	c.mu.Lock()
	zcs := c.zoneList()
	c.mu.Unlock()
	for _, zc := range zcs {
		if err := zc.rejoinBudget(ctx); err != nil {
			return
		}
	}
	c.rejoined.Store(time.Now().UnixNano())
	c.breaker.reset()
	c.replayPurges()
}

var heartbeatScript = redis.NewScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, id in ipairs(gone) do redis.call('HDEL', KEYS[2], id) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
local out = {}
for i, id in ipairs(ids) do
	out[#out + 1] = id
	out[#out + 1] = redis.call('HGET', KEYS[2], id) or ''
end
return out
`)

// heartbeat renews this instance's membership and reads the live members.
func (c *cluster) heartbeat(ctx context.Context) error {
	info, _ := json.Marshal(memberInfo{ID: c.id, Name: c.name})
	res, err := heartbeatScript.Run(ctx, c.rdb, []string{c.key("members"), c.key("member-info")},
		c.id, memberTTL.Milliseconds(), string(info)).StringSlice()
	if err != nil {
		return err
	}
	var list []memberInfo
	for i := 0; i+1 < len(res); i += 2 {
		var m memberInfo
		if json.Unmarshal([]byte(res[i+1]), &m) != nil {
			m = memberInfo{ID: res[i]}
		}
		m.ID, m.Self = res[i], res[i] == c.id
		list = append(list, m)
	}
	n := int64(max(1, len(list)))
	c.mu.Lock()
	c.memberList = list
	zcs := c.zoneList()
	// The share divisor grows at once and shrinks only once a member has
	// been gone for memberTTL: after Redis restarts empty, the members
	// reappear one heartbeat at a time, and a smaller N would hand each of
	// the first ones a bigger share of the budget meanwhile.
	prev := c.liveMembers.Load()
	switch {
	case n >= prev:
		c.fewerSince = time.Time{}
	case c.fewerSince.IsZero():
		c.fewerSince = time.Now()
		n = prev
	case time.Since(c.fewerSince) < memberTTL:
		n = prev
	default:
		c.fewerSince = time.Time{}
	}
	c.mu.Unlock()
	if c.liveMembers.Swap(n) != n {
		for _, zc := range zcs {
			if b := zc.budget.Load(); b != nil {
				b.applyShare()
			}
		}
	}
	return nil
}

// members returns the live members last seen.
func (c *cluster) members() []memberInfo {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]memberInfo(nil), c.memberList...)
}

// listen delivers lock releases and freed origin slots (published by other
// instances) to the flights waiting for them. Messages lost while the
// subscription reconnects cost only a poll interval: waiters also poll.
func (c *cluster) listen() {
	defer c.wg.Done()
	for c.ctx.Err() == nil {
		if !c.breaker.allow() {
			sleepCtx(c.ctx, probeInterval)
			continue
		}
		ps := c.rdb.Subscribe(c.ctx, c.key("notify"))
		ch := ps.Channel(redis.WithChannelHealthCheckInterval(time.Second))
		c.drain(ch)
		_ = ps.Close()
	}
}

func (c *cluster) drain(ch <-chan *redis.Message) {
	for {
		select {
		case <-c.ctx.Done():
			return
		case m, ok := <-ch:
			if !ok {
				return
			}
			c.notify.fire(m.Payload)
		}
	}
}

// renewLoop extends the leases of the locks and origin slots this instance
// holds, every third of the lease, so that they end soon after it dies.
func (c *cluster) renewLoop() {
	defer c.wg.Done()
	t := time.NewTicker(c.cfg.lease / 3)
	defer t.Stop()
	for {
		select {
		case <-c.ctx.Done():
			return
		case <-t.C:
		}
		locks, slots := c.renew.snapshot()
		if len(locks)+len(slots) == 0 || !c.breaker.allow() {
			continue
		}
		lease := c.cfg.lease.Milliseconds()
		_ = c.callTimeout(c.ctx, max(c.cfg.timeout, 250*time.Millisecond), func(ctx context.Context) error {
			_, err := c.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
				// Eval, not Run: EVALSHA cannot fall back to EVAL inside a pipeline.
				for key, token := range locks {
					renewLockScript.Eval(ctx, p, []string{key}, token, lease)
				}
				for s := range slots {
					renewSlotScript.Eval(ctx, p, []string{s.key}, s.member, lease)
				}
				return nil
			})
			return err
		})
	}
}

var renewLockScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then
	return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
`)

var renewSlotScript = redis.NewScript(`
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
	local t = redis.call('TIME')
	local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
	redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
	redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) + 1000)
	return 1
end
return 0
`)

// breaker is the circuit breaker in front of Redis. Closed, every call goes
// through; breakerThreshold consecutive failures open it, and then no request
// calls Redis; the cluster's probe closes it again.
type breaker struct {
	open     atomic.Bool
	fails    atomic.Int32
	onChange func(open bool)
}

func (b *breaker) allow() bool { return !b.open.Load() }

func (b *breaker) success() {
	if b.fails.Load() != 0 {
		b.fails.Store(0)
	}
}

func (b *breaker) failure() {
	if b.fails.Add(1) >= breakerThreshold {
		b.trip()
	}
}

// trip opens the breaker.
func (b *breaker) trip() {
	if b.open.CompareAndSwap(false, true) && b.onChange != nil {
		b.onChange(true)
	}
}

// reset closes the breaker after a successful probe.
func (b *breaker) reset() {
	b.fails.Store(0)
	if b.open.CompareAndSwap(true, false) && b.onChange != nil {
		b.onChange(false)
	}
}

// notifier wakes the flights waiting on a key (a lock or a zone's origin slots)
// when the cluster's subscription delivers a message naming it.
type notifier struct {
	mu sync.Mutex // guards m
	m  map[string]*notice
}

type notice struct {
	ch   chan struct{}
	refs int
}

func newNotifier() *notifier { return &notifier{m: make(map[string]*notice)} }

// subscribe returns a channel closed at the next message for key; done must
// be called when the caller stops waiting.
func (n *notifier) subscribe(key string) (ch <-chan struct{}, done func()) {
	n.mu.Lock()
	defer n.mu.Unlock()
	e, ok := n.m[key]
	if !ok {
		e = &notice{ch: make(chan struct{})}
		n.m[key] = e
	}
	e.refs++
	return e.ch, func() {
		n.mu.Lock()
		defer n.mu.Unlock()
		e.refs--
		if e.refs == 0 && n.m[key] == e {
			delete(n.m, key)
		}
	}
}

func (n *notifier) fire(key string) {
	n.mu.Lock()
	e, ok := n.m[key]
	if ok {
		delete(n.m, key)
	}
	n.mu.Unlock()
	if ok {
		close(e.ch)
	}
}

// renewer lists the leases this instance holds, for renewLoop.
type renewer struct {
	mu    sync.Mutex // guards locks and slots
	locks map[string]string
	slots map[slotLease]struct{}
}

type slotLease struct{ key, member string }

func newRenewer() *renewer {
	return &renewer{locks: make(map[string]string), slots: make(map[slotLease]struct{})}
}

func (r *renewer) addLock(key, token string) {
	r.mu.Lock()
	r.locks[key] = token
	r.mu.Unlock()
}

func (r *renewer) removeLock(key string) {
	r.mu.Lock()
	delete(r.locks, key)
	r.mu.Unlock()
}

func (r *renewer) addSlot(key, member string) {
	r.mu.Lock()
	r.slots[slotLease{key, member}] = struct{}{}
	r.mu.Unlock()
}

func (r *renewer) removeSlot(key, member string) {
	r.mu.Lock()
	delete(r.slots, slotLease{key, member})
	r.mu.Unlock()
}

func (r *renewer) snapshot() (map[string]string, map[slotLease]struct{}) {
	r.mu.Lock()
	defer r.mu.Unlock()
	locks := make(map[string]string, len(r.locks))
	for k, v := range r.locks {
		locks[k] = v
	}
	slots := make(map[slotLease]struct{}, len(r.slots))
	for k := range r.slots {
		slots[k] = struct{}{}
	}
	return locks, slots
}

// randomToken returns n random bytes in hex: lock tokens, slot members, member ids.
func randomToken(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// sleepCtx sleeps for d or until ctx ends.
func sleepCtx(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// msString formats a duration in whole milliseconds for Redis arguments.
func msString(d time.Duration) string { return strconv.FormatInt(d.Milliseconds(), 10) }

// Interface guards
var _ caddy.Destructor = (*cluster)(nil)

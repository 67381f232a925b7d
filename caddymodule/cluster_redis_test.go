package caddymodule

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// testRedis starts a redis-server without persistence on a spare port, or
// skips the test when redis-server is not installed.
func testRedis(t *testing.T) (addr string, cmd *exec.Cmd) {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Skip("redis-server is not installed (apt-get install -y redis-server): cluster tests against Redis skipped")
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	addr = fmt.Sprintf("127.0.0.1:%d", port)
	cmd = exec.Command(bin, "--port", fmt.Sprint(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGCONT)
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		if c, err := net.DialTimeout("tcp", addr, 100*time.Millisecond); err == nil {
			_, _ = c.Write([]byte("PING\r\n"))
			_ = c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
			line, _ := bufio.NewReader(c).ReadString('\n')
			c.Close()
			if strings.HasPrefix(line, "+PONG") {
				return addr, cmd
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("redis-server did not start")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// testCluster connects a cluster (one simulated instance) to addr.
func testCluster(t *testing.T, addr, prefix string, extra func(*RedisConfig)) *cluster {
	t.Helper()
	rc := &RedisConfig{Address: addr, KeyPrefix: prefix, Timeout: caddy.Duration(100 * time.Millisecond), Lease: caddy.Duration(time.Second)}
	if extra != nil {
		extra(rc)
	}
	cfg, _, err := rc.resolve()
	if err != nil {
		t.Fatal(err)
	}
	cl, err := newCluster(cfg, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cl.Destruct() })
	return cl
}

// testClusterZone makes a zone in cluster mode.
func testClusterZone(t *testing.T, cl *cluster, name string) *zone {
	t.Helper()
	z, err := newZone(zoneShape{name: name, memory: 8 << 20, maxObject: 1 << 20}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = z.Destruct() })
	z.budget.(*clusterBudget).attach(cl.zone(name))
	return z
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestClusterCoalescesAcrossInstances: two instances (two clusters on one
// Redis) fetch the same key; one asks the origin, the other waits on its lock
// and is answered from L2.
func TestClusterCoalescesAcrossInstances(t *testing.T) {
	addr, _ := testRedis(t)
	a, b := testCluster(t, addr, "coalesce", nil), testCluster(t, addr, "coalesce", nil)
	za, zb := testClusterZone(t, a, "z"), testClusterZone(t, b, "z")

	var hits atomic.Int64
	release := make(chan struct{})
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		hits.Add(1)
		<-release
		w.Header().Set("Cache-Control", "max-age=60")
		w.Header().Set("Surrogate-Key", "t1")
		_, err := io.WriteString(w, "shared body")
		return err
	})
	pol := &policy{name: "test", maxWait: 5 * time.Second, originTimeout: 5 * time.Second, uncacheableHint: time.Minute}
	req := httptest.NewRequest(http.MethodGet, "http://api.test/x", nil)
	key := requestKey(req)
	job := func() fetchJob {
		return fetchJob{next: next, req: req.Clone(context.Background()), owner: req, primary: key, key: key,
			pol: pol, maxObject: 1 << 20, tagHeader: "Surrogate-Key"}
	}
	fa, _ := za.flights.join(key)
	go za.runFlight(job(), fa)
	eventually(t, "the first fetch", func() bool { return hits.Load() == 1 })
	fb, _ := zb.flights.join(key)
	go zb.runFlight(job(), fb)
	eventually(t, "the second instance to wait on the lock", func() bool { return zb.clusterOf().metrics.lockWaits.Load() == 1 })
	close(release)

	resA, err := fa.wait(context.Background(), 5*time.Second)
	if err != nil || !resA.stored || resA.cluster != clusterNone {
		t.Fatalf("holder: %+v %v", resA, err)
	}
	resB, err := fb.wait(context.Background(), 5*time.Second)
	if err != nil || resB.cluster != clusterL2Hit || string(resB.resp.body) != "shared body" {
		t.Fatalf("follower: %+v %v", resB, err)
	}
	if hits.Load() != 1 {
		t.Fatalf("origin saw %d requests, want 1", hits.Load())
	}
	if e, _ := zb.store.lookup(key, req.Header); e == nil || string(e.body) != "shared body" {
		t.Fatal("the L2 hit was not kept in the follower's L1")
	}

	// A purge by tag on one instance: L2 and the other instance's L1.
	n, err := a.purgeL2(context.Background(), []*zoneCluster{a.zone("z")}, purgeMessage{Tag: "t1"})
	if err != nil || n != 1 {
		t.Fatalf("L2 tag purge: %d, %v", n, err)
	}
	fc, _ := za.flights.join(key)
	hits.Store(0)
	go za.runFlight(job(), fc)
	if res, _ := fc.wait(context.Background(), 5*time.Second); res.cluster != clusterNone || hits.Load() != 1 {
		t.Fatalf("after the purge: %+v, %d origin requests; want a fetch", res, hits.Load())
	}
}

// TestClusterMarkers: a URL one instance found not storable is passed
// through by the others at once, without waiting for a lock.
func TestClusterMarkers(t *testing.T) {
	addr, _ := testRedis(t)
	a, b := testCluster(t, addr, "markers", nil), testCluster(t, addr, "markers", nil)
	za, zb := testClusterZone(t, a, "z"), testClusterZone(t, b, "z")
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		w.Header().Set("Cache-Control", "private")
		_, err := io.WriteString(w, "mine")
		return err
	})
	pol := &policy{name: "test", maxWait: 5 * time.Second, originTimeout: 5 * time.Second, uncacheableHint: time.Minute}
	req := httptest.NewRequest(http.MethodGet, "http://api.test/private", nil)
	key := requestKey(req)
	job := fetchJob{next: next, req: req.Clone(context.Background()), owner: req, primary: key, key: key, pol: pol, maxObject: 1 << 20}
	fa, _ := za.flights.join(key)
	za.runFlight(job, fa)
	if res := fa.res; res.stored || res.reason != "private" {
		t.Fatalf("first instance: %+v", res)
	}
	fb, _ := zb.flights.join(key)
	zb.runFlight(job, fb)
	if res := fb.res; res.cluster != clusterL2Marker || res.shareable || res.reason != "private" {
		t.Fatalf("second instance: %+v, want the marker's pass-through", res)
	}
}

// TestClusterGCRAAndSlots: the fleet budget on Redis's clock.
func TestClusterGCRAAndSlots(t *testing.T) {
	addr, _ := testRedis(t)
	cl := testCluster(t, addr, "gcra", nil)
	zc := cl.zone("z")
	ctx := context.Background()
	for i := range 5 {
		if g, err := zc.gcra(ctx, 10, 5, 0, 0); err != nil || !g.ok || g.wait != 0 {
			t.Fatalf("burst token %d: %+v %v", i, g, err)
		}
	}
	if g, _ := zc.gcra(ctx, 10, 5, 0, 0); g.ok {
		t.Fatal("a sixth token at once from a burst of 5")
	}
	g, err := zc.gcra(ctx, 10, 5, 200*time.Millisecond, 0)
	if err != nil || !g.ok || g.wait <= 0 || g.wait > 100*time.Millisecond {
		t.Fatalf("a token reserved within 200ms at 10/s: %+v %v", g, err)
	}
	if g, _ := zc.gcra(ctx, 10, 5, 0, 0); g.ok || g.tokens > -0.9 {
		t.Fatalf("after the reservation: %+v, want a refusal and a token debt", g)
	}

	var members []string
	for range 2 {
		m, err := zc.takeSlot(ctx, 2, 0, false)
		if err != nil {
			t.Fatal(err)
		}
		members = append(members, m)
	}
	if _, err := zc.takeSlot(ctx, 2, 0, false); err != errOriginBudget {
		t.Fatalf("a third slot of 2: %v", err)
	}
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	got := make(chan error, 1)
	go func() { _, err := zc.takeSlot(wctx, 2, 0, true); got <- err }()
	zc.releaseSlot(members[0]) // publishes: the waiter is woken
	if err := <-got; err != nil {
		t.Fatalf("waiting for a slot: %v", err)
	}
}

// TestClusterRedisPaused: a hung Redis (SIGSTOP) costs a call its timeout and
// no more; the breaker opens, the request path stops calling, and the probe
// rejoins after SIGCONT.
func TestClusterRedisPaused(t *testing.T) {
	addr, cmd := testRedis(t)
	cl := testCluster(t, addr, "paused", func(rc *RedisConfig) { rc.Timeout = caddy.Duration(50 * time.Millisecond) })
	zc := cl.zone("z")
	if err := cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	for i := 0; cl.healthy(); i++ {
		start := time.Now()
		_, err := zc.gcra(context.Background(), 10, 5, 0, 0)
		// The bound is the timeout; the slack covers scheduling under -race.
		if took := time.Since(start); err == nil || took > 50*time.Millisecond+150*time.Millisecond {
			t.Fatalf("call %d against a paused Redis: %s, %v", i, took, err)
		}
		if i > breakerThreshold {
			t.Fatal("the breaker did not open")
		}
	}
	start := time.Now()
	if _, err := zc.gcra(context.Background(), 10, 5, 0, 0); err != errClusterDown || time.Since(start) > 10*time.Millisecond {
		t.Fatalf("with the breaker open: %v after %s, want errClusterDown at once", err, time.Since(start))
	}
	// A purge meanwhile is queued, and sent on rejoin.
	cl.queuePurge(purgeMessage{URL: "api.test/x", From: cl.id})
	if err := cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the rejoin", cl.healthy)
	eventually(t, "the queued purge to be sent", func() bool {
		cl.mu.Lock()
		defer cl.mu.Unlock()
		return len(cl.pending) == 0
	})
}

// TestClusterPurgeStream: a purge published by one instance reaches another
// instance's L1 and is acknowledged.
func TestClusterPurgeStream(t *testing.T) {
	addr, _ := testRedis(t)
	a, b := testCluster(t, addr, "stream", nil), testCluster(t, addr, "stream", nil)
	// applyPurge finds zones through the pool, as it does for configured ones;
	// the pool destroys it.
	zb, err := newZone(zoneShape{name: "stream-z", memory: 8 << 20, maxObject: 1 << 20}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	zb.budget.(*clusterBudget).attach(b.zone("stream-z"))
	if _, _, err := zones.LoadOrNew("test|stream-z", func() (caddy.Destructor, error) { return zb, nil }); err != nil {
		t.Fatal(err)
	}
	defer zones.Delete("test|stream-z")
	e := &entry{status: 200, header: http.Header{}, body: []byte("old"), responseTime: time.Now(), lifetime: time.Minute}
	if err := zb.store.put("api.test/p", http.Header{}, e); err != nil {
		t.Fatal(err)
	}
	eventually(t, "both members", func() bool { return len(a.members()) == 2 })
	id, err := a.publishPurge(context.Background(), purgeMessage{URL: "api.test/p", From: a.id})
	if err != nil {
		t.Fatal(err)
	}
	if acked, members := a.waitAcks(context.Background(), id); acked != 1 || members != 1 {
		t.Fatalf("acknowledged by %d of %d", acked, members)
	}
	if e, _ := zb.store.lookup("api.test/p", http.Header{}); e != nil {
		t.Fatal("the other instance still holds the purged entry")
	}
}

// TestClusterPurgeGap: purges trimmed from the stream before an instance read
// them are detected by their sequence numbers, and the instance's entries
// become stale.
func TestClusterPurgeGap(t *testing.T) {
	addr, _ := testRedis(t)
	a := testCluster(t, addr, "gap", nil)
	stream := a.key("purge")
	ctx := context.Background()
	var ids []string
	for i := range 5 {
		id, err := a.publishPurge(ctx, purgeMessage{URL: fmt.Sprintf("api.test/%d", i), From: "other"})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	read := func(after string) []redis.XMessage {
		t.Helper()
		msgs, err := a.rdb.XRange(ctx, stream, "("+after, "+").Result()
		if err != nil {
			t.Fatal(err)
		}
		return msgs
	}
	if last, gap := purgeGap(2, read(ids[1])); gap || last != 5 {
		t.Fatalf("nothing trimmed: gap %v, last %d", gap, last)
	}
	// Trim to the newest two: the entry after ids[1] (the third) is lost.
	if err := a.rdb.XTrimMaxLen(ctx, stream, 2).Err(); err != nil {
		t.Fatal(err)
	}
	if _, gap := purgeGap(2, read(ids[1])); !gap {
		t.Fatal("entries after the last applied trimmed: no gap seen")
	}
	if _, gap := purgeGap(3, read(ids[2])); gap {
		t.Fatal("only entries already applied trimmed: gap seen")
	}
	if _, gap := purgeGap(0, read(ids[1])); gap {
		t.Fatal("a reader that does not know its position sees no gap")
	}

	// softPurgeAll makes the cluster's entries stale, and keeps them.
	z, err := newZone(zoneShape{name: "gap-z", memory: 8 << 20, maxObject: 1 << 20}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	z.budget.(*clusterBudget).attach(a.zone("gap-z"))
	if _, _, err := zones.LoadOrNew("test|gap-z", func() (caddy.Destructor, error) { return z, nil }); err != nil {
		t.Fatal(err)
	}
	defer zones.Delete("test|gap-z")
	e := &entry{status: 200, header: http.Header{}, body: []byte("x"), responseTime: time.Now(), lifetime: time.Minute, swr: time.Minute}
	if err := z.store.put("api.test/g", http.Header{}, e); err != nil {
		t.Fatal(err)
	}
	a.softPurgeAll()
	got, _ := z.store.lookup("api.test/g", http.Header{})
	if got == nil || got.freshFor(time.Now()) > 0 || !got.withinStaleWindow(time.Now(), got.swr) {
		t.Fatalf("after the gap: %+v, want the entry kept, stale, within its window", got)
	}
}

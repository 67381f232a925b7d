// Package cluster tests Shield's cluster mode end to end: a real
// redis-server (started here, on a spare port, without persistence), three
// Caddy instances built from this checkout and run as processes, and counting
// origins. It does not use caddytest: the integration package runs an
// in-process Caddy on fixed ports, and a cluster needs several processes
// (some of which the tests kill).
package cluster

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// host is the Host every request names: behind a load balancer all instances
// see the same one, and it is part of the cache key.
const host = "api.test"

var (
	caddyBin   string // built once by TestMain
	redisBin   string // "" when redis-server is not installed
	buildError error
)

func TestMain(m *testing.M) {
	redisBin, _ = exec.LookPath("redis-server")
	dir, err := os.MkdirTemp("", "shield-cluster-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if redisBin != "" {
		caddyBin = filepath.Join(dir, "caddy")
		build := exec.Command("go", "build", "-o", caddyBin, "./cmd/caddy")
		build.Dir = filepath.Join("..", "..")
		if out, err := build.CombinedOutput(); err != nil {
			buildError = fmt.Errorf("building caddy: %v\n%s", err, out)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// needCluster skips the test without redis-server and fails it when the
// Caddy binary could not be built.
func needCluster(t *testing.T) {
	t.Helper()
	if redisBin == "" {
		t.Skip("redis-server is not installed (apt-get install -y redis-server; .ci/run installs it): cluster tests skipped")
	}
	if buildError != nil {
		t.Fatal(buildError)
	}
}

// freePort returns a port nothing listens on now.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// redisServer is a redis-server process the test controls.
type redisServer struct {
	t    *testing.T
	port int
	cmd  *exec.Cmd
	log  string
}

// startRedis starts a redis-server without persistence on a spare port.
func startRedis(t *testing.T) *redisServer {
	t.Helper()
	r := &redisServer{t: t, port: freePort(t), log: filepath.Join(t.TempDir(), "redis.log")}
	r.start()
	t.Cleanup(r.kill)
	return r
}

func (r *redisServer) addr() string { return fmt.Sprintf("127.0.0.1:%d", r.port) }

func (r *redisServer) start() {
	r.t.Helper()
	r.cmd = exec.Command(redisBin, "--port", fmt.Sprint(r.port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--logfile", r.log)
	if err := r.cmd.Start(); err != nil {
		r.t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !r.ping() {
		if time.Now().After(deadline) {
			r.t.Fatalf("redis-server on %s did not answer", r.addr())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// ping says whether Redis answers PING.
func (r *redisServer) ping() bool {
	c, err := net.DialTimeout("tcp", r.addr(), 200*time.Millisecond)
	if err != nil {
		return false
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(200 * time.Millisecond))
	if _, err := c.Write([]byte("PING\r\n")); err != nil {
		return false
	}
	line, _ := bufio.NewReader(c).ReadString('\n')
	return strings.HasPrefix(line, "+PONG")
}

// kill is kill -9.
func (r *redisServer) kill() {
	if r.cmd != nil && r.cmd.Process != nil {
		_ = r.cmd.Process.Signal(syscall.SIGCONT) // a stopped process cannot be reaped otherwise
		_ = r.cmd.Process.Kill()
		_ = r.cmd.Wait()
		r.cmd = nil
	}
}

func (r *redisServer) signal(sig syscall.Signal) {
	r.t.Helper()
	if err := r.cmd.Process.Signal(sig); err != nil {
		r.t.Fatal(err)
	}
}

// instance is one Caddy process of the fleet.
type instance struct {
	name  string
	http  int
	admin int
	cmd   *exec.Cmd
	log   string
	done  chan struct{}
}

// fleet is the Caddy instances of a test, their shared client and the origin they front.
type fleet struct {
	t         *testing.T
	instances []*instance
	client    *http.Client
}

// fleetConfig describes the instances: extra lines for the cluster redis
// block, and the site's body (shield blocks, reverse_proxy) with {origin}
// replaced by the origin's address.
type fleetConfig struct {
	redis   *redisServer
	prefix  string        // key_prefix: each test its own, so nothing carries over
	timeout time.Duration // the cluster's Redis timeout; default redisTimeout
	cluster string        // extra lines inside cluster redis { }
	site    string
	origin  string
}

// redisTimeout is the instances' Redis timeout in these tests: 250ms rather
// than the 50ms default. The 2-core machine runs three Caddy instances, Redis,
// the origin and this race-instrumented load generator at once, and a call to
// a healthy Redis can queue behind them for tens of milliseconds. A timeout
// that fires while Redis is healthy is a (partial) Redis failure, which is
// not what the healthy-path tests are about; the failure test checks that no
// request waits more than this timeout plus a margin.
const redisTimeout = 250 * time.Millisecond

// startFleet starts n Caddy instances sharing one cluster, and waits until
// each answers on its admin API and sees all n members.
func startFleet(t *testing.T, n int, cfg fleetConfig) *fleet {
	t.Helper()
	f := &fleet{t: t, client: newClient(64)}
	dir := t.TempDir()
	timeout := cfg.timeout
	if timeout == 0 {
		timeout = redisTimeout
	}
	for i := range n {
		in := &instance{name: string(rune('A' + i)), http: freePort(t), admin: freePort(t), done: make(chan struct{})}
		caddyfile := fmt.Sprintf(`{
	admin 127.0.0.1:%d
	http_port %d
	grace_period 1s
	shield {
		cluster redis {
			address %s
			key_prefix %s
			timeout %s
%s
		}
	}
}

http://:%d {
%s
}
`, in.admin, in.http, cfg.redis.addr(), cfg.prefix, timeout, cfg.cluster, in.http, strings.ReplaceAll(cfg.site, "{origin}", cfg.origin))
		file := filepath.Join(dir, "Caddyfile."+in.name)
		if err := os.WriteFile(file, []byte(caddyfile), 0o644); err != nil {
			t.Fatal(err)
		}
		in.log = filepath.Join(dir, "caddy."+in.name+".log")
		logFile, err := os.Create(in.log)
		if err != nil {
			t.Fatal(err)
		}
		in.cmd = exec.Command(caddyBin, "run", "--config", file, "--adapter", "caddyfile")
		in.cmd.Stdout, in.cmd.Stderr = logFile, logFile
		in.cmd.Env = append(os.Environ(), "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir, "HOME="+dir)
		if err := in.cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() { _ = in.cmd.Wait(); logFile.Close(); close(in.done) }()
		f.instances = append(f.instances, in)
	}
	t.Cleanup(func() {
		for _, in := range f.instances {
			in.stop()
		}
		if t.Failed() {
			for _, in := range f.instances {
				b, _ := os.ReadFile(in.log)
				for _, l := range strings.Split(string(b), "\n") {
					if strings.Contains(l, `"logger":"shield"`) {
						t.Logf("instance %s: %s", in.name, l)
					}
				}
				lines := strings.Split(strings.TrimSpace(string(b)), "\n")
				t.Logf("--- last lines of instance %s's log:\n%s", in.name, strings.Join(lines[max(0, len(lines)-25):], "\n"))
			}
		}
	})
	for _, in := range f.instances {
		f.waitMembers(in, n, 20*time.Second)
	}
	return f
}

// waitMembers waits until an instance's cluster is ok and sees n members.
func (f *fleet) waitMembers(in *instance, n int, limit time.Duration) {
	f.t.Helper()
	deadline := time.Now().Add(limit)
	for {
		s, err := in.stats()
		if err == nil && s.Cluster != nil && s.Cluster.State == "ok" && len(s.Cluster.Members) == n {
			return
		}
		if time.Now().After(deadline) {
			f.t.Fatalf("instance %s: cluster not ok with %d members after %s (stats %+v, err %v)", in.name, n, limit, s.Cluster, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stop ends an instance gently; kill ends it with SIGKILL.
func (in *instance) stop() {
	select {
	case <-in.done:
		return
	default:
	}
	_ = in.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-in.done:
	case <-time.After(5 * time.Second):
		_ = in.cmd.Process.Kill()
		<-in.done
	}
}

func (in *instance) kill() {
	_ = in.cmd.Process.Kill()
	<-in.done
}

func (in *instance) url(path string) string {
	return fmt.Sprintf("http://127.0.0.1:%d%s", in.http, path)
}

// stats is what the tests read of GET /shield/stats.
type stats struct {
	Zones []struct {
		Name    string `json:"name"`
		Cluster *struct {
			L2Hits    uint64 `json:"l2_hits"`
			L2Misses  uint64 `json:"l2_misses"`
			LockWaits uint64 `json:"lock_waits"`
			Takeovers uint64 `json:"lock_takeovers"`
			L2Writes  uint64 `json:"l2_writes"`
			Degraded  uint64 `json:"degraded_fetches"`
			Fallbacks uint64 `json:"budget_fallbacks"`
		} `json:"cluster"`
	} `json:"zones"`
	Cluster *struct {
		State   string `json:"state"`
		Members []struct {
			ID string `json:"id"`
		} `json:"members"`
	} `json:"cluster"`
}

func (in *instance) stats() (stats, error) {
	var s stats
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/shield/stats", in.admin))
	if err != nil {
		return s, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return s, fmt.Errorf("stats: %s", resp.Status)
	}
	return s, json.NewDecoder(resp.Body).Decode(&s)
}

// purge posts a purge to an instance's admin API and returns its answer.
func (in *instance) purge(t *testing.T, body string) map[string]any {
	t.Helper()
	resp, err := http.Post(fmt.Sprintf("http://127.0.0.1:%d/shield/purge", in.admin), "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("purge %s: %s %s", body, resp.Status, raw)
	}
	var out map[string]any
	if err := json.Unmarshal(raw, &out); err != nil {
		t.Fatal(err)
	}
	return out
}

// newClient is a client with a bounded number of connections per instance,
// as a load balancer would keep: the 2-core test machine runs three Caddy
// instances, Redis and this (race-instrumented) process.
func newClient(conns int) *http.Client {
	return &http.Client{
		Timeout: 30 * time.Second,
		Transport: &http.Transport{
			MaxConnsPerHost:     conns,
			MaxIdleConnsPerHost: conns,
			IdleConnTimeout:     30 * time.Second,
		},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}

// result is one answer as a test keeps it.
type result struct {
	status      int
	body        string
	cacheStatus string
	latency     time.Duration
	err         error
}

// get sends GET path to an instance with the fleet's Host.
func (f *fleet) get(in *instance, path string) result {
	return f.do(context.Background(), http.MethodGet, in, path, nil)
}

// getVia is get through another client (its own connections).
func (f *fleet) getVia(c *http.Client, in *instance, path string) result {
	return f.doVia(c, context.Background(), http.MethodGet, in, path, nil)
}

func (f *fleet) do(ctx context.Context, method string, in *instance, path string, trace *httptrace.ClientTrace) result {
	return f.doVia(f.client, ctx, method, in, path, trace)
}

func (f *fleet) doVia(c *http.Client, ctx context.Context, method string, in *instance, path string, trace *httptrace.ClientTrace) result {
	if trace != nil {
		ctx = httptrace.WithClientTrace(ctx, trace)
	}
	req, err := http.NewRequestWithContext(ctx, method, in.url(path), nil)
	if err != nil {
		return result{err: err}
	}
	req.Host = host
	start := time.Now()
	resp, err := c.Do(req)
	if err != nil {
		return result{err: err, latency: time.Since(start)}
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return result{status: resp.StatusCode, body: string(b), cacheStatus: resp.Header.Get("Cache-Status"),
		latency: time.Since(start), err: err}
}

// mustGet fails the test unless GET path answers 200, and returns the result.
func (f *fleet) mustGet(in *instance, path string) result {
	f.t.Helper()
	r := f.get(in, path)
	if r.err != nil || r.status != http.StatusOK {
		f.t.Fatalf("GET %s on %s: %d %q (%s) %v", path, in.name, r.status, r.body, r.cacheStatus, r.err)
	}
	return r
}

// origin is a counting backend that remembers when each request arrived.
type origin struct {
	*httptest.Server
	hits atomic.Int64

	mu       sync.Mutex // guards arrivals and inFlight, maxFlight
	arrivals []time.Time
	inFlight int
	maxIn    int
}

func newOrigin(t *testing.T, handler func(w http.ResponseWriter, r *http.Request, n int64)) *origin {
	t.Helper()
	o := &origin{}
	o.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := o.hits.Add(1)
		o.mu.Lock()
		o.arrivals = append(o.arrivals, time.Now())
		o.inFlight++
		o.maxIn = max(o.maxIn, o.inFlight)
		o.mu.Unlock()
		defer func() {
			o.mu.Lock()
			o.inFlight--
			o.mu.Unlock()
		}()
		handler(w, r, n)
	}))
	t.Cleanup(o.Close)
	return o
}

func (o *origin) hostPort() string { return strings.TrimPrefix(o.URL, "http://") }

// times returns the arrival times of the requests so far.
func (o *origin) times() []time.Time {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]time.Time(nil), o.arrivals...)
}

func (o *origin) maxInFlight() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.maxIn
}

// maxInWindow is the most arrivals within any window of length w.
func maxInWindow(times []time.Time, w time.Duration) int {
	sort.Slice(times, func(i, j int) bool { return times[i].Before(times[j]) })
	best, lo := 0, 0
	for hi := range times {
		for times[hi].Sub(times[lo]) >= w {
			lo++
		}
		best = max(best, hi-lo+1)
	}
	return best
}

// statusCounts sums answers by a short form of their Cache-Status.
func statusCounts(results []result) map[string]int {
	out := map[string]int{}
	for _, r := range results {
		key := fmt.Sprint(r.status)
		switch cs := r.cacheStatus; {
		case strings.Contains(cs, "detail=l2-hit"):
			key += " l2-hit"
		case strings.Contains(cs, "collapsed"):
			key += " coalesced"
		case strings.Contains(cs, "; hit"):
			key += " hit"
		case strings.Contains(cs, "fwd=stale"):
			key += " stale"
		case strings.Contains(cs, "fwd="):
			key += " " + strings.TrimPrefix(strings.Split(cs, ";")[1], " ")
		}
		if i := strings.Index(r.cacheStatus, "detail="); i >= 0 && !strings.Contains(key, "l2-hit") {
			key += " " + strings.Split(r.cacheStatus[i:], ";")[0]
		}
		if r.err != nil {
			key = "error"
		}
		out[key]++
	}
	return out
}

// spread sends n requests at once, round-robin over the instances, at most
// conns in flight per instance (the client's limit), and returns the answers.
func (f *fleet) spread(n int, path func(i int) string, trace *httptrace.ClientTrace) []result {
	results := make([]result, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = f.do(context.Background(), http.MethodGet, f.instances[i%len(f.instances)], path(i), trace)
		}()
	}
	wg.Wait()
	return results
}

// jsonBody compacts a JSON literal for a request body.
func jsonBody(v any) string {
	var b bytes.Buffer
	_ = json.NewEncoder(&b).Encode(v)
	return b.String()
}

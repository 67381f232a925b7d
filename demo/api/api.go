// Package api is the demo's origin: a JSON API that behaves like a service in
// front of a database. Every data request holds one of a fixed number of
// "database connections" for a query's latency; when all are busy a request
// queues briefly and then fails with 503, which is how a real database-backed
// API falls over under a burst.
package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Defaults for Config's zero fields.
const (
	DefaultAddr         = "127.0.0.1:9001"
	DefaultPoolSize     = 8
	DefaultLatency      = 20 * time.Millisecond
	DefaultQueueTimeout = 50 * time.Millisecond
)

// errPoolExhausted is what clients see when no connection frees up in time.
var errPoolExhausted = errors.New("database pool exhausted")

// Config sets up the API. Zero fields take the defaults above.
type Config struct {
	// Addr is where the demo listens; New does not listen, callers do.
	Addr string
	// PoolSize is the number of "database connections".
	PoolSize int
	// Latency is how long one query holds a connection; up to a tenth more is
	// added at random so that requests do not finish in lockstep.
	Latency time.Duration
	// QueueTimeout is how long a request waits for a free connection before
	// it fails with 503.
	QueueTimeout time.Duration
}

func (c Config) withDefaults() Config {
	if c.Addr == "" {
		c.Addr = DefaultAddr
	}
	if c.PoolSize <= 0 {
		c.PoolSize = DefaultPoolSize
	}
	if c.Latency <= 0 {
		c.Latency = DefaultLatency
	}
	if c.QueueTimeout <= 0 {
		c.QueueTimeout = DefaultQueueTimeout
	}
	return c
}

// Stats counts what the API did since it started or was last reset.
type Stats struct {
	// Queries is how many requests got a connection and ran a query.
	Queries int64 `json:"queries"`
	// Served is how many data requests were answered with 200 or 304.
	Served int64 `json:"served"`
	// Rejected is how many requests failed with 503 for want of a connection.
	Rejected int64 `json:"rejected"`
	// InFlight is how many queries hold a connection right now.
	InFlight int64 `json:"in_flight"`
	// PeakInFlight is the most queries that held a connection at once.
	PeakInFlight int64 `json:"peak_in_flight"`
}

// Server is the API's http.Handler.
type Server struct {
	cfg  Config
	pool chan struct{}
	mux  *http.ServeMux

	queries, served, rejected, inFlight, peak atomic.Int64

	mu       sync.Mutex
	versions map[int]int64 // user id -> version, bumped by POST

	// wait stands for the query itself; tests replace it to hold connections
	// for as long as they need without sleeping.
	wait func(ctx context.Context, d time.Duration) error
}

// New returns the API with cfg's defaults filled in. It does not listen.
func New(cfg Config) *Server {
	cfg = cfg.withDefaults()
	s := &Server{
		cfg:      cfg,
		pool:     make(chan struct{}, cfg.PoolSize),
		mux:      http.NewServeMux(),
		versions: map[int]int64{},
		wait:     sleep,
	}
	s.mux.HandleFunc("GET /users/{id}", s.getUser)
	s.mux.HandleFunc("POST /users/{id}", s.postUser)
	s.mux.HandleFunc("GET /products/{id}", s.getProduct)
	s.mux.HandleFunc("GET /payments/{id}", s.getPayment)
	s.mux.HandleFunc("GET /__stats", s.getStats)
	s.mux.HandleFunc("POST /__reset", s.postReset)
	s.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "not found")
	})
	return s
}

// Config returns the configuration in force, defaults included.
func (s *Server) Config() Config { return s.cfg }

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.mux.ServeHTTP(w, r) }

// Stats returns a snapshot of the counters.
func (s *Server) Stats() Stats {
	return Stats{
		Queries:      s.queries.Load(),
		Served:       s.served.Load(),
		Rejected:     s.rejected.Load(),
		InFlight:     s.inFlight.Load(),
		PeakInFlight: s.peak.Load(),
	}
}

// Reset zeroes the counters and the users' versions. Queries in flight stay
// counted in InFlight, so the peak restarts from them.
func (s *Server) Reset() {
	s.queries.Store(0)
	s.served.Store(0)
	s.rejected.Store(0)
	s.peak.Store(s.inFlight.Load())
	s.mu.Lock()
	clear(s.versions)
	s.mu.Unlock()
}

// query holds a connection for one query's latency. It fails with
// errPoolExhausted when none frees up within the queue timeout.
func (s *Server) query(ctx context.Context) error {
	timer := time.NewTimer(s.cfg.QueueTimeout)
	defer timer.Stop()
	select {
	case s.pool <- struct{}{}:
	case <-timer.C:
		s.rejected.Add(1)
		return errPoolExhausted
	case <-ctx.Done():
		return fmt.Errorf("wait for a connection: %w", ctx.Err())
	}
	defer func() { <-s.pool }()

	s.queries.Add(1)
	n := s.inFlight.Add(1)
	defer s.inFlight.Add(-1)
	for {
		p := s.peak.Load()
		if n <= p || s.peak.CompareAndSwap(p, n) {
			break
		}
	}

	d := s.cfg.Latency
	if j := int64(d / 10); j > 0 {
		d += time.Duration(rand.Int64N(j + 1))
	}
	if err := s.wait(ctx, d); err != nil {
		return fmt.Errorf("query: %w", err)
	}
	return nil
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// runQuery runs a query and writes the error response when it fails.
func (s *Server) runQuery(w http.ResponseWriter, r *http.Request) bool {
	err := s.query(r.Context())
	if err == nil {
		return true
	}
	if errors.Is(err, errPoolExhausted) {
		// Retry-After and no-store, as a real API would send with a 503.
		w.Header().Set("Retry-After", "1")
		writeError(w, http.StatusServiceUnavailable, errPoolExhausted.Error())
		return false
	}
	// The client went away; nobody reads this.
	writeError(w, http.StatusServiceUnavailable, err.Error())
	return false
}

type user struct {
	ID          int    `json:"id"`
	Name        string `json:"name"`
	Email       string `json:"email"`
	Version     int64  `json:"version"`
	GeneratedAt string `json:"generated_at"`
}

func (s *Server) userVersion(id int, bump bool) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, ok := s.versions[id]
	if !ok {
		v = 1
	}
	if bump {
		v++
	}
	s.versions[id] = v
	return v
}

func (s *Server) writeUser(w http.ResponseWriter, r *http.Request, bump bool) {
	id, ok := pathID(w, r)
	if !ok || !s.runQuery(w, r) {
		return
	}
	// No Cache-Control on purpose: the Caddyfile's ttl decides.
	first, last := name(id)
	s.writeOK(w, http.StatusOK, user{
		ID:          id,
		Name:        first + " " + last,
		Email:       strings.ToLower(first+"."+last) + "@example.com",
		Version:     s.userVersion(id, bump),
		GeneratedAt: time.Now().UTC().Format(time.RFC3339Nano),
	})
}

func (s *Server) getUser(w http.ResponseWriter, r *http.Request)  { s.writeUser(w, r, false) }
func (s *Server) postUser(w http.ResponseWriter, r *http.Request) { s.writeUser(w, r, true) }

type product struct {
	ID         int    `json:"id"`
	Name       string `json:"name"`
	PriceCents int    `json:"price_cents"`
}

func (s *Server) getProduct(w http.ResponseWriter, r *http.Request) {
	id, ok := pathID(w, r)
	if !ok || !s.runQuery(w, r) {
		return
	}
	// The body is the same for the same product, so a strong validator fits;
	// no timestamp in it for that reason.
	body, err := json.Marshal(product{ID: id, Name: productName(id), PriceCents: 100 + id*37%9900})
	if err != nil {
		writeError(w, http.StatusInternalServerError, "encode product")
		return
	}
	h := fnv.New64a()
	h.Write(body)
	etag := fmt.Sprintf(`"%016x"`, h.Sum64())

	w.Header().Set("Cache-Control", "public, max-age=30")
	w.Header().Set("ETag", etag)
	if etagMatches(r.Header.Get("If-None-Match"), etag) {
		s.served.Add(1)
		w.WriteHeader(http.StatusNotModified)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	w.Write(append(body, '\n'))
	s.served.Add(1)
}

// etagMatches is If-None-Match's weak comparison (RFC 9110, 13.1.2).
func etagMatches(header, etag string) bool {
	if header == "" {
		return false
	}
	want := strings.TrimPrefix(etag, "W/")
	for _, t := range strings.Split(header, ",") {
		t = strings.TrimSpace(t)
		if t == "*" || strings.TrimPrefix(t, "W/") == want {
			return true
		}
	}
	return false
}

type payment struct {
	ID          int    `json:"id"`
	Status      string `json:"status"`
	AmountCents int    `json:"amount_cents"`
	GeneratedAt string `json:"generated_at"`
}

func (s *Server) getPayment(w http.ResponseWriter, r *http.Request) {
	id, ok := pathID(w, r)
	if !ok || !s.runQuery(w, r) {
		return
	}
	// Deliberately no Cache-Control: the Caddyfile's bypass rule is what keeps
	// payments out of the cache, which is the point of showing it.
	statuses := []string{"pending", "settled", "refunded"}
	s.writeOK(w, http.StatusOK, payment{
		ID:          id,
		Status:      statuses[id%len(statuses)],
		AmountCents: 500 + id*91%50000,
		GeneratedAt: time.Now().UTC().Format(time.RFC3339Nano),
	})
}

func (s *Server) getStats(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, http.StatusOK, s.Stats())
}

func (s *Server) postReset(w http.ResponseWriter, r *http.Request) {
	s.Reset()
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, http.StatusOK, s.Stats())
}

// pathID reads a positive {id} or answers 404.
func pathID(w http.ResponseWriter, r *http.Request) (int, bool) {
	id, err := strconv.Atoi(r.PathValue("id"))
	if err != nil || id <= 0 {
		writeError(w, http.StatusNotFound, "no such id")
		return 0, false
	}
	return id, true
}

func (s *Server) writeOK(w http.ResponseWriter, status int, v any) {
	writeJSON(w, status, v)
	s.served.Add(1)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		http.Error(w, "encode response", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	w.Write(append(body, '\n'))
}

// writeError answers with {"error": msg}; errors are never cacheable.
func writeError(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, status, map[string]string{"error": msg})
}

var (
	firstNames   = []string{"Ada", "Grace", "Alan", "Edsger", "Barbara", "Ken", "Radia", "Donald", "Frances", "Dennis", "Margaret", "Leslie"}
	lastNames    = []string{"Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Thompson", "Perlman", "Knuth", "Allen", "Ritchie", "Hamilton", "Lamport"}
	productNames = []string{"Kettle", "Lamp", "Notebook", "Backpack", "Mug", "Headphones", "Chair", "Umbrella", "Keyboard", "Plant"}
)

func name(id int) (first, last string) {
	return firstNames[id%len(firstNames)], lastNames[(id/len(firstNames))%len(lastNames)]
}

func productName(id int) string {
	return fmt.Sprintf("%s #%d", productNames[id%len(productNames)], id)
}

// Command origin is the benchmark's backend: a small HTTP server answering
// /users/{id} with a JSON document of exactly -size bytes, counting what it
// serves so the benchmark can tell hits from misses.
//
//	GET /users/{id}  200, application/json, -size bytes (any other path too)
//	GET /__stats     {"requests":N,"inflight":N,"peak_inflight":N} (not counted)
//
// It prints "listening on ADDR" on stderr once it accepts connections.
package main

import (
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

type origin struct {
	size         int
	cacheControl string
	latency      time.Duration

	requests atomic.Int64
	inflight atomic.Int64
	peak     atomic.Int64
}

// document returns a JSON object naming id, padded with 'x' to exactly size
// bytes (longer only when the fixed part alone exceeds size).
func (o *origin) document(id string) []byte {
	head := `{"id":"` + id + `","pad":"`
	const tail = `"}`
	pad := max(o.size-len(head)-len(tail), 0)
	b := make([]byte, 0, len(head)+pad+len(tail))
	b = append(b, head...)
	b = append(b, strings.Repeat("x", pad)...)
	return append(b, tail...)
}

func (o *origin) serveStats(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	fmt.Fprintf(w, `{"requests":%d,"inflight":%d,"peak_inflight":%d}`+"\n",
		o.requests.Load(), o.inflight.Load(), o.peak.Load())
}

func (o *origin) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/__stats" {
		o.serveStats(w, r)
		return
	}
	o.requests.Add(1)
	n := o.inflight.Add(1)
	defer o.inflight.Add(-1)
	for p := o.peak.Load(); n > p && !o.peak.CompareAndSwap(p, n); p = o.peak.Load() {
	}
	if o.latency > 0 {
		time.Sleep(o.latency)
	}
	id := strings.TrimPrefix(r.URL.Path, "/users/")
	if id == r.URL.Path || id == "" || strings.ContainsAny(id, `"\/`) {
		id = "0"
	}
	body := o.document(id)
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	if o.cacheControl != "" {
		h.Set("Cache-Control", o.cacheControl)
	}
	if r.Method != http.MethodHead {
		_, _ = w.Write(body)
	}
}

func main() {
	addr := flag.String("addr", "127.0.0.1:18080", "listen address (loopback)")
	size := flag.Int("size", 1024, "body size in bytes")
	cc := flag.String("cache-control", "", "Cache-Control sent with every answer (none by default)")
	latency := flag.Duration("latency", 0, "delay before answering, to stand for a database")
	printBody := flag.String("print", "", "print the body for this id on stdout and exit")
	flag.Parse()

	o := &origin{size: *size, cacheControl: *cc, latency: *latency}
	if *printBody != "" {
		fmt.Print(string(o.document(*printBody)))
		return
	}
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	log.Printf("listening on %s", ln.Addr())
	srv := &http.Server{Handler: o, ReadHeaderTimeout: 10 * time.Second}
	log.Fatal(srv.Serve(ln))
}

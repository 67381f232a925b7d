// Command demo runs the Shield demo: a stand-in for a database-backed API and,
// in the same process, Caddy with Shield in front of it.
//
//	go run ./cmd/demo                 # API on 127.0.0.1:9001, Caddy from Caddyfile.example
//	go run ./cmd/demo burst [flags]   # the same burst straight at the API, then through Shield
package main

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"time"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/shieldcache/shield/caddymodule"

	"github.com/shieldcache/shield/demo/api"
)

// caddyURL is where Caddyfile.example serves; the demo does not parse it.
const caddyURL = "http://localhost:8080"

func main() {
	if len(os.Args) > 1 && os.Args[1] == "burst" {
		if err := runBurst(os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, "demo burst:", err)
			os.Exit(1)
		}
		return
	}
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	apiAddr := fs.String("api-addr", api.DefaultAddr, "listen address of the demo API")
	pool := fs.Int("pool", api.DefaultPoolSize, "database connections in the demo API's pool")
	latency := fs.Duration("latency", api.DefaultLatency, "time one query holds a connection")
	config := fs.String("config", "Caddyfile.example", "Caddyfile to run Caddy with")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: demo [flags]\n       demo burst [flags]   (demo burst -h for its flags)\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if _, err := os.Stat(*config); err != nil {
		return fmt.Errorf("caddyfile: %w (run from the repository root or pass -config)", err)
	}

	srv := api.New(api.Config{Addr: *apiAddr, PoolSize: *pool, Latency: *latency})
	cfg := srv.Config()
	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return fmt.Errorf("start api: %w", err)
	}
	go serve(ln, srv)

	fmt.Printf(`Shield demo
  API (a database-backed service, %d connections, %v per query): http://%s
  Caddy with Shield, from %s: %s
`, cfg.PoolSize, cfg.Latency, ln.Addr(), *config, caddyURL)
	if cfg.Addr != api.DefaultAddr {
		fmt.Printf("  note: Caddyfile.example proxies to %s; point its reverse_proxy at %s\n", api.DefaultAddr, ln.Addr())
	}
	fmt.Printf(`
Try, in another terminal:
  curl -si %[1]s/users/1 | grep -i cache-status     # a miss: fetched and stored
  curl -si %[1]s/users/1 | grep -i cache-status     # a hit: the API is not asked
  curl -si %[1]s/payments/1 | grep -i cache-status  # bypassed: never cached
API counters: curl -s http://%[2]s/__stats

`, caddyURL, ln.Addr())

	// Caddy's own command line from here on: it handles signals and exits.
	os.Args = []string{os.Args[0], "run", "--config", *config, "--adapter", "caddyfile"}
	caddycmd.Main()
	return nil
}

// serve runs the demo API on ln until the process exits.
func serve(ln net.Listener, h http.Handler) {
	s := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	if err := s.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		fmt.Fprintln(os.Stderr, "demo: api:", err)
	}
}

package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"

	"github.com/shieldcache/shield/demo/api"
	"github.com/shieldcache/shield/demo/burst"
)

// burstCaddyfile fronts the API with Shield on spare ports, admin off and
// nothing written to disk. Logs are kept to errors so the table stays
// readable.
const burstCaddyfile = `{
	admin off
	persist_config off
	log {
		level ERROR
	}
}

http://{caddy} {
{shield}	reverse_proxy {api}
}
`

// shieldBlock has the route policies of Caddyfile.example. Its fetch
// concurrency matches the database pool, so that misses wait in Shield rather
// than in the database's queue, where they would time out.
const shieldBlock = `	shield {
		origin_concurrency {pool}
		rule /users/* {
			ttl 30s
			stale_while_revalidate 30s
		}
		rule /products/* {
			stale_while_revalidate 30s
		}
		rule /payments/* {
			bypass
		}
	}
`

// burstConfig is what the burst subcommand's flags set.
type burstConfig struct {
	clients, requests, keys int
	path                    string // with one %d for the key
	pool                    int
	latency                 time.Duration
	noShield                bool
}

func runBurst(args []string) error {
	var c burstConfig
	fs := flag.NewFlagSet("demo burst", flag.ContinueOnError)
	fs.IntVar(&c.clients, "clients", 200, "concurrent clients")
	fs.IntVar(&c.requests, "requests", 2000, "requests per run")
	fs.IntVar(&c.keys, "keys", 20, "distinct hot keys the requests spread over")
	fs.StringVar(&c.path, "path", "/users/%d", "request path, %d is the key")
	out := fs.String("out", "", "write an SVG chart of both runs to this file")
	fs.IntVar(&c.pool, "pool", api.DefaultPoolSize, "database connections in the demo API's pool")
	fs.DurationVar(&c.latency, "latency", api.DefaultLatency, "time one query holds a connection")
	fs.BoolVar(&c.noShield, "no-shield", false, "second run through Caddy with reverse_proxy alone, for comparison")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if strings.Count(c.path, "%d") != 1 || !strings.HasPrefix(c.path, "/") {
		return fmt.Errorf("-path %q: want one %%d in a path starting with /", c.path)
	}
	if c.clients <= 0 || c.requests <= 0 || c.keys <= 0 {
		return errors.New("-clients, -requests and -keys must be positive")
	}

	results, err := burstRuns(context.Background(), c, os.Stdout)
	if err != nil {
		return err
	}
	if err := burst.WriteTable(os.Stdout, results); err != nil {
		return err
	}
	if *out != "" {
		if err := writeSVG(*out, results); err != nil {
			return err
		}
		fmt.Printf("\nchart: %s\n", *out)
	}
	return nil
}

// burstRuns starts the API and Caddy in this process on spare loopback
// ports, fires the burst straight at the API, resets it, fires the same burst
// through Caddy, and stops both. It describes the setup on w.
func burstRuns(ctx context.Context, c burstConfig, w io.Writer) ([]burst.Result, error) {
	srv := api.New(api.Config{Addr: "127.0.0.1:0", PoolSize: c.pool, Latency: c.latency})
	cfg := srv.Config()
	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("start api: %w", err)
	}
	apiServer := &http.Server{Handler: srv, ReadHeaderTimeout: 5 * time.Second}
	go apiServer.Serve(ln)
	defer apiServer.Close()
	apiAddr := ln.Addr().String()

	// Caddy on another spare port, found by listening and letting go: Caddy
	// needs a concrete address in its config.
	caddyAddr, err := spareAddr()
	if err != nil {
		return nil, err
	}
	block := shieldBlock
	label := "via caddy + shield"
	if c.noShield {
		block, label = "", "via caddy (no shield)"
	}
	caddyfile := strings.NewReplacer("{shield}", block).Replace(burstCaddyfile)
	caddyfile = strings.NewReplacer("{caddy}", caddyAddr, "{api}", apiAddr,
		"{pool}", strconv.Itoa(cfg.PoolSize)).Replace(caddyfile)
	if err := startCaddy(caddyfile); err != nil {
		return nil, err
	}
	defer caddy.Stop()
	// Through Caddy to an endpoint that runs no query, so the check leaves the
	// counters and the cache as they were.
	if err := check("http://" + caddyAddr + "/__stats"); err != nil {
		return nil, fmt.Errorf("caddy is not answering: %w", err)
	}

	fmt.Fprintf(w, "API: %d connections, %v per query, %v queue timeout. Burst: %d clients, %d GETs over %d keys (%s).\n\n",
		cfg.PoolSize, cfg.Latency, cfg.QueueTimeout, c.clients, c.requests, c.keys, fmt.Sprintf(c.path, 1)+"…")

	opts := burst.Options{
		Clients:       c.clients,
		Requests:      c.requests,
		Keys:          c.keys,
		Path:          func(k int) string { return fmt.Sprintf(c.path, k) },
		OriginQueries: func() int64 { return srv.Stats().Queries },
	}
	var results []burst.Result
	for i, run := range []struct{ label, base string }{
		{"direct to api", "http://" + apiAddr},
		{label, "http://" + caddyAddr},
	} {
		if i > 0 {
			if err := post("http://" + apiAddr + "/__reset"); err != nil {
				return nil, fmt.Errorf("reset api: %w", err)
			}
		}
		opts.Label, opts.BaseURL = run.label, run.base
		r, err := burst.Run(ctx, opts)
		if err != nil {
			return nil, err
		}
		st := srv.Stats()
		r.OriginQueries, r.OriginRejections = st.Queries, st.Rejected
		results = append(results, r)
	}
	return results, nil
}

// startCaddy adapts a Caddyfile and loads it into this process's Caddy.
func startCaddy(caddyfile string) error {
	adapter := caddyconfig.GetAdapter("caddyfile")
	if adapter == nil {
		return errors.New("caddyfile adapter not registered")
	}
	cfgJSON, warnings, err := adapter.Adapt([]byte(caddyfile), map[string]any{"filename": "burst.Caddyfile"})
	if err != nil {
		return fmt.Errorf("adapt caddyfile: %w", err)
	}
	for _, w := range warnings {
		fmt.Fprintln(os.Stderr, "caddyfile:", w.String())
	}
	if err := caddy.Load(cfgJSON, true); err != nil {
		return fmt.Errorf("load caddy config: %w", err)
	}
	return nil
}

func spareAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("find a spare port: %w", err)
	}
	addr := ln.Addr().String()
	if err := ln.Close(); err != nil {
		return "", fmt.Errorf("find a spare port: %w", err)
	}
	return addr, nil
}

func check(url string) error {
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("get %s: status %d", url, resp.StatusCode)
	}
	return nil
}

func post(url string) error {
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Post(url, "application/json", nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("post %s: status %d", url, resp.StatusCode)
	}
	return nil
}

func writeSVG(name string, results []burst.Result) error {
	f, err := os.Create(name)
	if err != nil {
		return fmt.Errorf("create chart: %w", err)
	}
	if err := burst.WriteSVG(f, results); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close chart: %w", err)
	}
	return nil
}

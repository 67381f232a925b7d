// Command loadgen is the benchmark's helper for what wrk does not do well:
// finding spare loopback ports, filling a cache with many distinct keys while
// watching a process's memory, and reading the origin's counters.
//
//	loadgen ports N
//	    prints N free loopback TCP ports, one a line
//	loadgen fill -base URL -prefix /users/k -n N [-from F] [-c C] [-pid PID]
//	    GETs base+prefix+i for every i in [F, F+N) over C keep-alive
//	    connections; prints key=value lines: requests, errors, non200, hits
//	    (Cache-Status with "hit"), seconds, rps and, with -pid, the largest
//	    VmRSS seen while sampling and the process's VmHWM at the end (KiB)
//	loadgen count -url URL
//	    prints the "requests" counter of the origin's /__stats
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "ports":
		err = ports(os.Args[2:])
	case "fill":
		err = fill(os.Args[2:])
	case "count":
		err = count(os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: loadgen ports N | fill -base URL -prefix P -n N [-from F] [-c C] [-pid PID] | count -url URL")
	os.Exit(2)
}

// ports holds all listeners open until every port is known, so the N are distinct.
func ports(args []string) error {
	if len(args) != 1 {
		return fmt.Errorf("ports wants a count")
	}
	n, err := strconv.Atoi(args[0])
	if err != nil || n < 1 {
		return fmt.Errorf("bad count %q", args[0])
	}
	var lns []net.Listener
	defer func() {
		for _, ln := range lns {
			ln.Close()
		}
	}()
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		lns = append(lns, ln)
	}
	for _, ln := range lns {
		fmt.Println(ln.Addr().(*net.TCPAddr).Port)
	}
	return nil
}

func newClient(conns int) *http.Client {
	return &http.Client{
		Timeout: 30 * time.Second,
		Transport: &http.Transport{
			MaxIdleConns:        conns,
			MaxIdleConnsPerHost: conns,
			DisableCompression:  true,
			DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		},
	}
}

func fill(args []string) error {
	fs := flag.NewFlagSet("fill", flag.ExitOnError)
	base := fs.String("base", "", "server base URL, e.g. http://127.0.0.1:8080")
	prefix := fs.String("prefix", "/users/", "path prefix; the key number is appended")
	from := fs.Int("from", 0, "first key number")
	n := fs.Int("n", 1000, "number of keys")
	conns := fs.Int("c", 32, "concurrent connections")
	pid := fs.Int("pid", 0, "process whose memory to sample (0: none)")
	_ = fs.Parse(args)
	if *base == "" {
		return fmt.Errorf("fill needs -base")
	}
	client := newClient(*conns)
	var next, done, errs, non200, hits atomic.Int64
	next.Store(int64(*from))
	end := int64(*from + *n)

	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	var maxRSS atomic.Int64
	if *pid > 0 {
		go sampleRSS(ctx, *pid, &maxRSS, func() string {
			return fmt.Sprintf("%d/%d requests", done.Load(), *n)
		})
	}

	start := time.Now()
	var wg sync.WaitGroup
	for range *conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 32<<10)
			for {
				i := next.Add(1) - 1
				if i >= end {
					return
				}
				resp, err := client.Get(*base + *prefix + strconv.FormatInt(i, 10))
				done.Add(1)
				if err != nil {
					errs.Add(1)
					continue
				}
				_, _ = io.CopyBuffer(io.Discard, resp.Body, buf)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					non200.Add(1)
				}
				if strings.Contains(resp.Header.Get("Cache-Status"), "hit") {
					hits.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	secs := time.Since(start).Seconds()
	stop()
	fmt.Printf("requests=%d\nerrors=%d\nnon200=%d\nhits=%d\nseconds=%.2f\nrps=%.0f\n",
		done.Load(), errs.Load(), non200.Load(), hits.Load(), secs, float64(done.Load())/secs)
	if *pid > 0 {
		st, err := procStatus(*pid)
		if err != nil {
			return err
		}
		fmt.Printf("max_sampled_rss_kib=%d\nend_rss_kib=%d\nhwm_kib=%d\n", max(maxRSS.Load(), st["VmRSS"]), st["VmRSS"], st["VmHWM"])
	}
	return nil
}

// sampleRSS records the largest VmRSS of pid every 100ms and logs progress on
// stderr every 10s, until ctx ends.
func sampleRSS(ctx context.Context, pid int, maxRSS *atomic.Int64, progress func() string) {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	lastLog := time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		st, err := procStatus(pid)
		if err != nil {
			continue
		}
		if rss := st["VmRSS"]; rss > maxRSS.Load() {
			maxRSS.Store(rss)
		}
		if time.Since(lastLog) >= 10*time.Second {
			lastLog = time.Now()
			fmt.Fprintf(os.Stderr, "  %s, rss %d KiB, hwm %d KiB\n", progress(), st["VmRSS"], st["VmHWM"])
		}
	}
}

// procStatus reads the kB fields of /proc/PID/status.
func procStatus(pid int) (map[string]int64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return nil, err
	}
	out := map[string]int64{}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok || !strings.HasSuffix(v, " kB") {
			continue
		}
		if n, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(v, " kB")), 10, 64); err == nil {
			out[k] = n
		}
	}
	return out, nil
}

func count(args []string) error {
	fs := flag.NewFlagSet("count", flag.ExitOnError)
	url := fs.String("url", "", "origin base URL")
	_ = fs.Parse(args)
	resp, err := newClient(1).Get(strings.TrimSuffix(*url, "/") + "/__stats")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var st struct {
		Requests int64 `json:"requests"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return err
	}
	fmt.Println(st.Requests)
	return nil
}

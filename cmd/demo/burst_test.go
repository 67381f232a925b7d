package main

import (
	"context"
	"io"
	"testing"
	"time"
)

// TestBurstRuns runs the burst subcommand's machinery end to end with a small
// burst: the API and Caddy in this process, straight and then through Caddy.
func TestBurstRuns(t *testing.T) {
	if testing.Short() {
		t.Skip("starts Caddy")
	}
	const clients, requests, keys = 20, 200, 5
	for _, noShield := range []bool{false, true} {
		name := "shield"
		if noShield {
			name = "no shield"
		}
		t.Run(name, func(t *testing.T) {
			// The deadline only stops a hang; nothing here checks speed.
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			results, err := burstRuns(ctx, burstConfig{
				clients: clients, requests: requests, keys: keys,
				path: "/users/%d", pool: 2, latency: 5 * time.Millisecond,
				noShield: noShield,
			}, io.Discard)
			if err != nil {
				t.Fatal(err)
			}
			if len(results) != 2 {
				t.Fatalf("%d results, want 2", len(results))
			}
			for _, r := range results {
				if r.Sent != requests || r.Errors != 0 {
					t.Fatalf("%s: sent %d, transport errors %d", r.Label, r.Sent, r.Errors)
				}
			}

			// Straight at the API, every request reaches the pool: it either
			// runs a query or is turned away.
			direct := results[0]
			if got := direct.OriginQueries + direct.OriginRejections; got != requests {
				t.Fatalf("direct: %d queries + %d rejections, want %d in all", direct.OriginQueries, direct.OriginRejections, requests)
			}
			if int64(direct.Non2xx) != direct.OriginRejections {
				t.Fatalf("direct: %d client non-2xx, %d origin rejections", direct.Non2xx, direct.OriginRejections)
			}

			via := results[1]
			if noShield {
				// Caddy alone forwards everything, so the API sees it all.
				if got := via.OriginQueries + via.OriginRejections; got != requests {
					t.Fatalf("%s: %d queries + %d rejections, want %d in all", via.Label, via.OriginQueries, via.OriginRejections, requests)
				}
				return
			}
			// With Shield, misses for a key coalesce into one fetch and the
			// fetch budget matches the pool: one query per key, no failures.
			if via.OriginQueries != keys || via.OriginRejections != 0 || via.Non2xx != 0 {
				t.Fatalf("%s: %d queries, %d rejections, %d client non-2xx; want %d, 0, 0",
					via.Label, via.OriginQueries, via.OriginRejections, via.Non2xx, keys)
			}
		})
	}
}

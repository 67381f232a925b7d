package caddymodule

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/url"
	"sort"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

func init() {
	caddy.RegisterModule(Admin{})
}

// Admin is the `admin.api.shield` module: purge and stats on Caddy's admin API.
//
//	POST /shield/purge  {"url": "http://host/path?q"} | {"prefix": "/users/", "host": "..."} |
//	                    {"tag": "user-42"} | {"zone": "users"}, each with optional "soft": true
//	                    and "zone" to restrict url, prefix or tag to one zone
//	GET  /shield/stats
type Admin struct{}

// CaddyModule returns the Caddy module information.
func (Admin) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.shield",
		New: func() caddy.Module { return new(Admin) },
	}
}

// Routes returns the admin routes. The module is created before any handler,
// so zones are looked up at request time.
func (a *Admin) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{
		{Pattern: "/shield/purge", Handler: caddy.AdminHandlerFunc(a.handlePurge)},
		{Pattern: "/shield/stats", Handler: caddy.AdminHandlerFunc(a.handleStats)},
	}
}

// purgeRequest is the body of POST /shield/purge.
type purgeRequest struct {
	URL    string `json:"url,omitempty"`
	Prefix string `json:"prefix,omitempty"`
	Host   string `json:"host,omitempty"`
	Tag    string `json:"tag,omitempty"`
	Zone   string `json:"zone,omitempty"`
	Soft   bool   `json:"soft,omitempty"`
}

type purgeResponse struct {
	Purged int  `json:"purged"`
	Soft   bool `json:"soft"`
	// Cluster is the purge's fate in L2 and on the other instances (cluster_purge.go).
	Cluster *clusterPurgeReport `json:"cluster,omitempty"`
}

// maxPurgeBody bounds a purge request: one small JSON object.
const maxPurgeBody = 64 << 10

func (a *Admin) handlePurge(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodPost {
		return apiError(http.StatusMethodNotAllowed, "use POST")
	}
	var req purgeRequest
	body, err := io.ReadAll(io.LimitReader(r.Body, maxPurgeBody+1))
	if err != nil {
		return apiError(http.StatusBadRequest, "reading the purge request: %v", err)
	}
	if len(body) > maxPurgeBody {
		return apiError(http.StatusRequestEntityTooLarge, "purge request larger than %d bytes", maxPurgeBody)
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		return apiError(http.StatusBadRequest, "invalid purge request: %v", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return apiError(http.StatusBadRequest, "invalid purge request: one JSON object expected, found more after it")
	}
	targets := 0
	for _, v := range []string{req.URL, req.Prefix, req.Tag} {
		if v != "" {
			targets++
		}
	}
	switch {
	case targets > 1:
		return apiError(http.StatusBadRequest, "give one of url, prefix or tag")
	case targets == 0 && req.Zone == "":
		return apiError(http.StatusBadRequest, "give one of url, prefix, tag or zone")
	case req.Host != "" && req.Prefix == "":
		return apiError(http.StatusBadRequest, "host goes with prefix")
	case req.Prefix != "" && !strings.HasPrefix(req.Prefix, "/"):
		return apiError(http.StatusBadRequest, "prefix must start with /")
	}
	var primary string
	if req.URL != "" {
		u, err := url.Parse(req.URL)
		if err != nil || u.Host == "" {
			return apiError(http.StatusBadRequest, "url must be absolute, like http://host/path?query")
		}
		primary = urlKey(u)
	}
	targetZones := liveZones()
	if req.Zone != "" {
		targetZones = slicesFilter(targetZones, func(z *zone) bool { return z.shape.name == req.Zone })
		if len(targetZones) == 0 {
			return apiError(http.StatusNotFound, "no zone named %q", req.Zone)
		}
	}
	n := 0
	for _, z := range targetZones {
		n += z.purge(primary, req.Prefix, req.Host, req.Tag, req.Soft)
	}
	z0 := "*"
	if req.Zone != "" {
		z0 = req.Zone
	}
	caddy.Log().Named("shield").Info("purged",
		zap.String("zone", z0), zap.Int("entries", n), zap.Bool("soft", req.Soft))
	// Cluster mode (cluster_purge.go): the same purge in L2 and on every other instance.
	fleet := broadcastPurge(r.Context(), req, primary, targetZones)
	return writeJSON(w, purgeResponse{Purged: n, Soft: req.Soft, Cluster: fleet})
}

// zoneStats is one zone in GET /shield/stats.
type zoneStats struct {
	Name          string   `json:"name"`
	Memory        int64    `json:"memory"`
	MaxObjectSize int64    `json:"max_object_size"`
	Entries       int      `json:"entries"`
	Bytes         int      `json:"bytes"`
	Evictions     uint64   `json:"evictions"`
	Hits          uint64   `json:"hits"`
	Stale         uint64   `json:"stale"`
	Misses        uint64   `json:"misses"`
	Coalesced     uint64   `json:"coalesced"`
	Rejected      uint64   `json:"rejected"`
	HitRatio      float64  `json:"hit_ratio"`
	Tokens        *float64 `json:"budget_tokens"` // null when the rate is unlimited
	InFlight      int      `json:"origin_in_flight"`
	// Cluster is the zone's part in the cluster, when in cluster mode (cluster.go).
	Cluster *zoneClusterStats `json:"cluster,omitempty"`
}

func (a *Admin) handleStats(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		return apiError(http.StatusMethodNotAllowed, "use GET")
	}
	out := struct {
		Zones   []zoneStats   `json:"zones"`
		Cluster *clusterState `json:"cluster,omitempty"` // cluster mode (cluster.go)
	}{Zones: []zoneStats{}, Cluster: clusterStats()}
	for _, z := range liveZones() {
		c := z.counts.snapshot()
		s := zoneStats{
			Name: z.shape.name, Memory: z.shape.memory, MaxObjectSize: z.shape.maxObject,
			Entries: z.store.len(), Bytes: z.store.capacity(), Evictions: z.store.evictions.Load(),
			Hits: c.hits, Stale: c.stale, Misses: c.misses, Coalesced: c.coalesced, Rejected: c.rejected,
			InFlight: z.budget.inFlight(), Cluster: z.clusterStats(),
		}
		if total := c.hits + c.stale + c.misses + c.coalesced + c.rejected; total > 0 {
			s.HitRatio = float64(c.hits+c.stale) / float64(total)
		}
		if t := z.budget.tokens(); !math.IsInf(t, 1) {
			s.Tokens = &t
		}
		out.Zones = append(out.Zones, s)
	}
	return writeJSON(w, out)
}

// liveZones lists the zones in use, by name.
func liveZones() []*zone {
	var out []*zone
	zones.Range(func(_, v any) bool {
		if z, ok := v.(*zone); ok {
			out = append(out, z)
		}
		return true
	})
	sort.Slice(out, func(i, j int) bool { return out[i].shape.poolKey() < out[j].shape.poolKey() })
	return out
}

func slicesFilter(zs []*zone, keep func(*zone) bool) []*zone {
	var out []*zone
	for _, z := range zs {
		if keep(z) {
			out = append(out, z)
		}
	}
	return out
}

func writeJSON(w http.ResponseWriter, v any) error {
	w.Header().Set("Content-Type", "application/json")
	return json.NewEncoder(w).Encode(v)
}

func apiError(code int, format string, args ...any) error {
	return caddy.APIError{HTTPStatus: code, Err: fmt.Errorf(format, args...)}
}

// Interface guards
var _ caddy.AdminRouter = (*Admin)(nil)

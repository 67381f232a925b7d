package caddymodule

import (
	"errors"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"
)

// Collectors are made once per process and registered in each config's
// registry, so counts survive reloads like the zones do. Labels stay bounded:
// zone names come from the config, outcomes and reasons from fixed sets.
var (
	requestsTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "shield", Name: "requests_total",
		Help: "Requests answered by Shield, by zone, outcome (hit, miss, stale, coalesced, bypass, uncacheable, rejected) and reason.",
	}, []string{"zone", "outcome", "reason"})
	originFetchesTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "shield", Name: "origin_fetches_total",
		Help: "Origin fetches made by Shield, by zone and reason (miss, revalidate, refresh, pass).",
	}, []string{"zone", "reason"})
	originFetchSeconds = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: "caddy", Subsystem: "shield", Name: "origin_fetch_duration_seconds",
		Help:    "Duration of Shield's coalesced origin fetches.",
		Buckets: prometheus.ExponentialBuckets(0.001, 2.5, 12),
	}, []string{"zone"})
	budgetWaitSeconds = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: "caddy", Subsystem: "shield", Name: "budget_wait_seconds",
		Help:    "Time fetches waited for the origin budget (token and slot).",
		Buckets: prometheus.ExponentialBuckets(0.001, 2.5, 12),
	}, []string{"zone"})
	budgetRejectionsTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "shield", Name: "budget_rejections_total",
		Help: "Fetches that found no origin budget within max_wait.",
	}, []string{"zone"})

	storeBytesDesc = prometheus.NewDesc("caddy_shield_store_bytes",
		"Bytes allocated by the zone's store (bounded by its memory).", []string{"zone"}, nil)
	storeEntriesDesc = prometheus.NewDesc("caddy_shield_store_entries",
		"Records in the zone's store (entries and vary specs).", []string{"zone"}, nil)
	storeEvictionsDesc = prometheus.NewDesc("caddy_shield_store_evictions_total",
		"Records evicted to make room in the zone's store.", []string{"zone"}, nil)
	budgetTokensDesc = prometheus.NewDesc("caddy_shield_budget_tokens",
		"Origin budget tokens left now (+Inf when unlimited).", []string{"zone"}, nil)
	budgetInFlightDesc = prometheus.NewDesc("caddy_shield_origin_in_flight",
		"Origin fetches holding a budget slot.", []string{"zone"}, nil)
)

// zoneCollector reports the zones' store and budget state at scrape time.
type zoneCollector struct{}

func (zoneCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- storeBytesDesc
	ch <- storeEntriesDesc
	ch <- storeEvictionsDesc
	ch <- budgetTokensDesc
	ch <- budgetInFlightDesc
}

func (zoneCollector) Collect(ch chan<- prometheus.Metric) {
	for _, z := range liveZones() {
		name := z.shape.name
		ch <- prometheus.MustNewConstMetric(storeBytesDesc, prometheus.GaugeValue, float64(z.store.capacity()), name)
		ch <- prometheus.MustNewConstMetric(storeEntriesDesc, prometheus.GaugeValue, float64(z.store.len()), name)
		ch <- prometheus.MustNewConstMetric(storeEvictionsDesc, prometheus.CounterValue, float64(z.store.evictions.Load()), name)
		ch <- prometheus.MustNewConstMetric(budgetTokensDesc, prometheus.GaugeValue, z.budget.tokens(), name)
		ch <- prometheus.MustNewConstMetric(budgetInFlightDesc, prometheus.GaugeValue, float64(z.budget.inFlight()), name)
	}
}

// registerMetrics adds Shield's collectors to the config's registry.
func registerMetrics(ctx caddy.Context) error {
	reg := ctx.GetMetricsRegistry()
	if reg == nil {
		return nil
	}
	for _, c := range []prometheus.Collector{requestsTotal, originFetchesTotal, originFetchSeconds,
		budgetWaitSeconds, budgetRejectionsTotal, zoneCollector{}} {
		if err := reg.Register(c); err != nil {
			var already prometheus.AlreadyRegisteredError
			if !errors.As(err, &already) {
				return err
			}
		}
	}
	return nil
}

// zoneMetrics caches a zone's labelled counters, so the request path does a
// map lookup rather than a label hash.
type zoneMetrics struct {
	zone     string
	mu       sync.RWMutex // guards requests and fetches
	requests map[outcomeKey]prometheus.Counter
	fetches  map[string]prometheus.Counter
	fetchDur prometheus.Observer
	wait     prometheus.Observer
	rejected prometheus.Counter
}

func newZoneMetrics(zone string) *zoneMetrics {
	return &zoneMetrics{
		zone:     zone,
		requests: make(map[outcomeKey]prometheus.Counter),
		fetches:  make(map[string]prometheus.Counter),
		fetchDur: originFetchSeconds.WithLabelValues(zone),
		wait:     budgetWaitSeconds.WithLabelValues(zone),
		rejected: budgetRejectionsTotal.WithLabelValues(zone),
	}
}

type outcomeKey struct{ outcome, reason string }

func (m *zoneMetrics) request(outcome, reason string) {
	k := outcomeKey{outcome, reason}
	m.mu.RLock()
	c, ok := m.requests[k]
	m.mu.RUnlock()
	if !ok {
		c = requestsTotal.WithLabelValues(m.zone, outcome, reason)
		m.mu.Lock()
		m.requests[k] = c
		m.mu.Unlock()
	}
	c.Inc()
}

func (m *zoneMetrics) fetch(reason string, d time.Duration) {
	m.mu.RLock()
	c, ok := m.fetches[reason]
	m.mu.RUnlock()
	if !ok {
		c = originFetchesTotal.WithLabelValues(m.zone, reason)
		m.mu.Lock()
		m.fetches[reason] = c
		m.mu.Unlock()
	}
	c.Inc()
	if reason != "pass" {
		m.fetchDur.Observe(d.Seconds())
	}
}

// statusReason pulls the detail parameter out of a Cache-Status value.
func statusReason(status string) string {
	i := strings.Index(status, "detail=")
	if i < 0 {
		return ""
	}
	reason := status[i+len("detail="):]
	if j := strings.IndexByte(reason, ';'); j >= 0 {
		reason = reason[:j]
	}
	return reason
}

package caddymodule

import (
	"errors"
	"sync/atomic"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"
)

// Cluster collectors, made once per process like the others (metrics.go).
var (
	clusterRedisErrors = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "shield", Name: "cluster_redis_errors_total",
		Help: "Redis calls that failed (timeout, connection) and count towards the circuit breaker.",
	})
	clusterRedisSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: "caddy", Subsystem: "shield", Name: "cluster_redis_call_duration_seconds",
		Help:    "Duration of Shield's Redis calls on the request path (cut at the cluster timeout).",
		Buckets: prometheus.ExponentialBuckets(0.0001, 2.5, 10),
	})
	clusterL2Total = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "shield", Name: "cluster_l2_lookups_total",
		Help: "L2 lookups of fetches, by zone and result (hit; lock: fetched here; wait: another instance was fetching; budget: the fleet budget refused; marker; error).",
	}, []string{"zone", "result"})
	clusterTakeoversTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "shield", Name: "cluster_lock_takeovers_total",
		Help: "Fetch locks taken over after the holder's lease ran out (the holder died or lost Redis).",
	}, []string{"zone"})
	clusterL2WritesTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "shield", Name: "cluster_l2_writes_total",
		Help: "Writes to L2 after a fetch, by zone and result (stored, l1_only: above max_l2_object_size, marker, error).",
	}, []string{"zone", "result"})
	clusterDegradedTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "shield", Name: "cluster_degraded_fetches_total",
		Help: "Fetches made without the cluster because Redis was unreachable.",
	}, []string{"zone"})
	clusterFallbacksTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "shield", Name: "cluster_budget_fallbacks_total",
		Help: "Origin budget decisions taken on the local fallback share because Redis was unreachable.",
	}, []string{"zone"})
	clusterPurgesTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "shield", Name: "cluster_purges_total",
		Help: "Purges through the cluster's stream, by direction (sent, received, queued while degraded, replayed).",
	}, []string{"direction"})

	clusterUpDesc = prometheus.NewDesc("caddy_shield_cluster_up",
		"1 while Redis is reachable, 0 while the cluster is degraded (local cache, fallback budget).", []string{"key_prefix"}, nil)
	clusterMembersDesc = prometheus.NewDesc("caddy_shield_cluster_members",
		"Live instances in the cluster, as last seen.", []string{"key_prefix"}, nil)
)

// clusterCollector reports the clusters' state at scrape time.
type clusterCollector struct{}

func (clusterCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- clusterUpDesc
	ch <- clusterMembersDesc
}

func (clusterCollector) Collect(ch chan<- prometheus.Metric) {
	clusters.Range(func(_, v any) bool {
		c, ok := v.(*cluster)
		if !ok {
			return true
		}
		up := 0.0
		if c.healthy() {
			up = 1
		}
		ch <- prometheus.MustNewConstMetric(clusterUpDesc, prometheus.GaugeValue, up, c.cfg.prefix)
		ch <- prometheus.MustNewConstMetric(clusterMembersDesc, prometheus.GaugeValue, float64(c.liveMembers.Load()), c.cfg.prefix)
		return true
	})
}

// registerClusterMetrics adds the cluster collectors to the config's registry.
func registerClusterMetrics(ctx caddy.Context) error {
	reg := ctx.GetMetricsRegistry()
	if reg == nil {
		return nil
	}
	for _, c := range []prometheus.Collector{clusterRedisErrors, clusterRedisSeconds, clusterL2Total, clusterTakeoversTotal,
		clusterL2WritesTotal, clusterDegradedTotal, clusterFallbacksTotal, clusterPurgesTotal, clusterCollector{}} {
		if err := reg.Register(c); err != nil {
			var already prometheus.AlreadyRegisteredError
			if !errors.As(err, &already) {
				return err
			}
		}
	}
	return nil
}

// zoneClusterMetrics counts a zone's cluster events, for /shield/stats and Prometheus.
type zoneClusterMetrics struct {
	l2Hits, l2Misses, lockWaits, takeovers, l2Writes, degraded, fallbackCount atomic.Uint64

	hitC, lockC, waitC, markerC, errorC prometheus.Counter
	budgetC                             prometheus.Counter
	takeoverC, degradedC, fallbackC     prometheus.Counter
	storedC, l1OnlyC, markWriteC, wErrC prometheus.Counter
}

func newZoneClusterMetrics(zone string) *zoneClusterMetrics {
	l2 := func(result string) prometheus.Counter { return clusterL2Total.WithLabelValues(zone, result) }
	w := func(result string) prometheus.Counter { return clusterL2WritesTotal.WithLabelValues(zone, result) }
	return &zoneClusterMetrics{
		hitC: l2("hit"), lockC: l2("lock"), waitC: l2("wait"), markerC: l2("marker"), errorC: l2("error"), budgetC: l2("budget"),
		takeoverC: clusterTakeoversTotal.WithLabelValues(zone),
		degradedC: clusterDegradedTotal.WithLabelValues(zone),
		fallbackC: clusterFallbacksTotal.WithLabelValues(zone),
		storedC:   w("stored"), l1OnlyC: w("l1_only"), markWriteC: w("marker"), wErrC: w("error"),
	}
}

func (m *zoneClusterMetrics) hit()    { m.l2Hits.Add(1); m.hitC.Inc() }
func (m *zoneClusterMetrics) locked() { m.l2Misses.Add(1); m.lockC.Inc() }
func (m *zoneClusterMetrics) waited() { m.lockWaits.Add(1); m.waitC.Inc() }
func (m *zoneClusterMetrics) marker() { m.markerC.Inc() }
func (m *zoneClusterMetrics) budgetRefused() {
	m.budgetC.Inc()
}
func (m *zoneClusterMetrics) lookupError() {
	m.errorC.Inc()
}
func (m *zoneClusterMetrics) takeover()      { m.takeovers.Add(1); m.takeoverC.Inc() }
func (m *zoneClusterMetrics) degradedFetch() { m.degraded.Add(1); m.degradedC.Inc() }
func (m *zoneClusterMetrics) fallback()      { m.fallbackCount.Add(1); m.fallbackC.Inc() }

func (m *zoneClusterMetrics) wrote(result string) {
	switch result {
	case "stored":
		m.l2Writes.Add(1)
		m.storedC.Inc()
	case "l1_only":
		m.l1OnlyC.Inc()
	case "marker":
		m.markWriteC.Inc()
	default:
		m.wErrC.Inc()
	}
}

package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Purges in cluster mode: the instance that receives a purge applies it to
// its L1 (purge.go), to L2 here, and appends it to a Redis Stream that every
// other instance reads (XREAD BLOCK, from the last entry it applied, so a
// dropped connection is caught up). Each instance acknowledges the last entry
// it applied; the purge answer waits (boundedly) for the live members'
// acknowledgements, so the fleet serves the new version once it is sent.
// Purges made while Redis is unreachable are queued and sent on rejoin.

const (
	purgeStreamLen = 10_000                 // entries kept in the stream (approximately)
	purgeAckWait   = 500 * time.Millisecond // longest a purge answer waits for the other instances
	purgeL2Timeout = 5 * time.Second        // bound on a purge's L2 work (prefix and zone purges scan)
	purgePending   = 1000                   // purges queued while degraded, at most
)

// purgeMessage is one purge as the stream carries it.
type purgeMessage struct {
	Zone   string `json:"zone,omitempty"` // restricts to one zone; with nothing else: the whole zone
	URL    string `json:"url,omitempty"`  // a primary cache key
	Prefix string `json:"prefix,omitempty"`
	Host   string `json:"host,omitempty"`
	Tag    string `json:"tag,omitempty"`
	Soft   bool   `json:"soft,omitempty"`
	From   string `json:"from"` // the member that sent it
}

// clusterPurgeReport is the cluster's part of a purge answer.
type clusterPurgeReport struct {
	L2      int    `json:"l2_purged"` // records purged (or soft-expired) in Redis
	Members int    `json:"members"`   // other live instances
	Acked   int    `json:"acked"`     // of those, how many applied it before the answer
	Queued  bool   `json:"queued,omitempty"`
	Error   string `json:"error,omitempty"`
}

// broadcastPurge takes a purge already applied to the local zones to L2 and
// to every other instance. It returns nil when no target is in cluster mode.
func broadcastPurge(ctx context.Context, req purgeRequest, primary string, targets []*zone) *clusterPurgeReport {
	byCluster := map[*cluster][]*zoneCluster{}
	for _, z := range targets {
		if zc := z.clusterOf(); zc != nil {
			byCluster[zc.cl] = append(byCluster[zc.cl], zc)
		}
	}
	if len(byCluster) == 0 {
		return nil
	}
	report := &clusterPurgeReport{}
	for cl, zcs := range byCluster {
		msg := purgeMessage{Zone: req.Zone, URL: primary, Prefix: req.Prefix, Host: req.Host, Tag: req.Tag, Soft: req.Soft, From: cl.id}
		if !cl.healthy() {
			cl.queuePurge(msg)
			report.Queued, report.Error = true, errClusterDown.Error()
			continue
		}
		n, err := cl.purgeL2(ctx, zcs, msg)
		report.L2 += n
		if err == nil {
			var id string
			if id, err = cl.publishPurge(ctx, msg); err == nil {
				acked, members := cl.waitAcks(ctx, id)
				report.Acked += acked
				report.Members += members
				continue
			}
		}
		cl.queuePurge(msg)
		report.Queued, report.Error = true, err.Error()
	}
	return report
}

// clusterInvalidate takes an invalidation by an unsafe method (RFC 9111 §4.4)
// to L2 and the other instances, so that none of them keeps serving the old
// response. Bounded by the cluster timeout; queued when Redis is unreachable.
func (z *zone) clusterInvalidate(primary string) {
	zc := z.clusterOf()
	if zc == nil {
		return
	}
	cl := zc.cl
	msg := purgeMessage{Zone: z.shape.name, URL: primary, From: cl.id}
	body, _ := json.Marshal(msg)
	err := cl.call(context.Background(), func(ctx context.Context) error {
		_, err := cl.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
			urlPurgeScript.Eval(ctx, p, zc.urlKeys(primary), "0") // Eval: EVALSHA cannot fall back inside a pipeline
			cl.publishScriptRun(ctx, p, body)
			return nil
		})
		return err
	})
	if err != nil {
		cl.queuePurge(msg)
		return
	}
	clusterPurgesTotal.WithLabelValues("sent").Inc()
}

func (zc *zoneCluster) urlKeys(primary string) []string {
	return []string{zc.recPrefix + primary, zc.varPrefix + primary, zc.markPrefix + primary}
}

// publishScript appends a purge to the stream with the next number of the
// fleet's purge sequence, so that a reader can tell when the stream was
// trimmed past entries it never read. KEYS stream, sequence; ARGV body, max length.
var publishScript = redis.NewScript(`
local n = redis.call('INCR', KEYS[2])
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'm', ARGV[1], 'n', n)
`)

func (c *cluster) publishScriptRun(ctx context.Context, r redis.Scripter, body []byte) *redis.Cmd {
	return publishScript.Eval(ctx, r, []string{c.key("purge"), c.key("purge-seq")}, string(body), purgeStreamLen)
}

// purgeL2 applies a purge to the zones' records in Redis.
func (c *cluster) purgeL2(ctx context.Context, zcs []*zoneCluster, msg purgeMessage) (int, error) {
	soft := "0"
	if msg.Soft {
		soft = "1"
	}
	total := 0
	for _, zc := range zcs {
		if msg.Zone != "" && msg.Zone != zc.name {
			continue
		}
		var n int
		var err error
		switch {
		case msg.URL != "":
			n, err = c.purgeScript(ctx, urlPurgeScript, zc.urlKeys(msg.URL), soft)
		case msg.Tag != "":
			n, err = c.purgeScript(ctx, tagPurgeScript, []string{zc.tagPrefix + msg.Tag}, soft)
		case msg.Prefix != "":
			host := strings.ToLower(msg.Host)
			pattern := zc.recPrefix + globEscape(host) + globEscape(msg.Prefix) + "*"
			if host == "" {
				pattern = zc.recPrefix + "*" + globEscape(msg.Prefix) + "*"
			}
			n, err = c.purgeScan(ctx, pattern, soft, func(key string) bool {
				p := primaryOf(strings.TrimPrefix(key, zc.recPrefix))
				slash := strings.IndexByte(p, '/')
				return slash >= 0 && (host == "" || p[:slash] == host) && strings.HasPrefix(p[slash:], msg.Prefix)
			})
		default:
			n, err = c.purgeScan(ctx, zc.recPrefix+"*", soft, nil)
			if err == nil && !msg.Soft {
				for _, prefix := range []string{zc.tagPrefix, zc.varPrefix, zc.markPrefix} {
					if _, err = c.purgeScan(ctx, prefix+"*", "0", nil); err != nil {
						break
					}
				}
			}
		}
		total += n
		if err != nil {
			return total, err
		}
	}
	return total, nil
}

// purgeScript runs one of the purge scripts and returns how many records it purged.
func (c *cluster) purgeScript(ctx context.Context, script *redis.Script, keys []string, soft string) (int, error) {
	var n int
	err := c.callTimeout(ctx, purgeL2Timeout, func(ctx context.Context) error {
		v, err := script.Run(ctx, c.rdb, keys, soft).Int()
		n = v
		return err
	})
	if err != nil {
		return 0, err
	}
	return n, nil
}

// purgeScan purges the records matching a SCAN pattern (and keep, if given), in batches.
func (c *cluster) purgeScan(ctx context.Context, pattern, soft string, keep func(string) bool) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, purgeL2Timeout)
	defer cancel()
	total := 0
	var cursor uint64
	for {
		var keys []string
		var next uint64
		from := cursor
		err := c.callTimeout(ctx, purgeL2Timeout, func(ctx context.Context) error {
			var err error
			keys, next, err = c.rdb.Scan(ctx, from, pattern, 1000).Result()
			return err
		})
		if err != nil {
			return total, err
		}
		cursor = next
		if keep != nil {
			kept := keys[:0]
			for _, k := range keys {
				if keep(k) {
					kept = append(kept, k)
				}
			}
			keys = kept
		}
		if len(keys) > 0 {
			n, err := c.purgeScript(ctx, keysPurgeScript, keys, soft)
			total += n
			if err != nil {
				return total, err
			}
		}
		if cursor == 0 {
			return total, nil
		}
	}
}

// The purge scripts delete records (hard) or make them stale (soft: fresh-until 0;
// L2 only ever answers fresh entries, so a soft-purged one is refetched).
const purgeFn = `
local soft = ARGV[1] == '1'
local n = 0
local function purge(k)
	if soft then
		if redis.call('HEXISTS', k, 'e') == 1 then
			redis.call('HSET', k, 'f', '0')
			n = n + 1
		end
	else
		n = n + redis.call('DEL', k)
	end
end
`

// urlPurgeScript: KEYS primary record, its variant set, its marker.
var urlPurgeScript = redis.NewScript(purgeFn + `
purge(KEYS[1])
for _, k in ipairs(redis.call('SMEMBERS', KEYS[2])) do purge(k) end
if not soft then redis.call('DEL', KEYS[2]) end
redis.call('DEL', KEYS[3])
return n
`)

// tagPurgeScript: KEYS the tag's set of records.
var tagPurgeScript = redis.NewScript(purgeFn + `
for _, k in ipairs(redis.call('SMEMBERS', KEYS[1])) do purge(k) end
if not soft then redis.call('DEL', KEYS[1]) end
return n
`)

// keysPurgeScript: KEYS the records.
var keysPurgeScript = redis.NewScript(purgeFn + `
for _, k in ipairs(KEYS) do purge(k) end
return n
`)

// globEscape quotes SCAN pattern metacharacters.
func globEscape(s string) string {
	var b strings.Builder
	for _, r := range s {
		switch r {
		case '*', '?', '[', ']', '\\':
			b.WriteByte('\\')
		}
		b.WriteRune(r)
	}
	return b.String()
}

// publishPurge appends a purge to the stream and returns its entry ID.
func (c *cluster) publishPurge(ctx context.Context, msg purgeMessage) (string, error) {
	body, _ := json.Marshal(msg)
	var id string
	err := c.call(ctx, func(ctx context.Context) error {
		var err error
		id, err = c.publishScriptRun(ctx, c.rdb, body).Text()
		return err
	})
	if err == nil {
		clusterPurgesTotal.WithLabelValues("sent").Inc()
	}
	return id, err
}

// waitAcks waits, at most purgeAckWait, until every other live member has
// applied the stream entry id; it returns how many did, out of how many.
func (c *cluster) waitAcks(ctx context.Context, id string) (acked, members int) {
	var keys []string
	for _, m := range c.members() {
		if m.ID != c.id {
			keys = append(keys, c.key("ack", m.ID))
		}
	}
	if len(keys) == 0 {
		return 0, 0
	}
	deadline := time.Now().Add(purgeAckWait)
	for {
		var vals []any
		err := c.call(ctx, func(ctx context.Context) error {
			var err error
			vals, err = c.rdb.MGet(ctx, keys...).Result()
			return err
		})
		if err != nil {
			return acked, len(keys)
		}
		acked = 0
		for _, v := range vals {
			if s, ok := v.(string); ok && !streamIDLess(s, id) {
				acked++
			}
		}
		if acked == len(keys) || time.Now().After(deadline) {
			return acked, len(keys)
		}
		sleepCtx(ctx, 5*time.Millisecond)
	}
}

// streamIDLess compares stream entry IDs (<ms>-<seq>).
func streamIDLess(a, b string) bool {
	am, as := splitStreamID(a)
	bm, bs := splitStreamID(b)
	return am < bm || (am == bm && as < bs)
}

func splitStreamID(id string) (ms, seq uint64) {
	m, s, _ := strings.Cut(id, "-")
	ms, _ = strconv.ParseUint(m, 10, 64)
	seq, _ = strconv.ParseUint(s, 10, 64)
	return ms, seq
}

// queuePurge keeps a purge made while Redis is unreachable, for the rejoin.
func (c *cluster) queuePurge(msg purgeMessage) {
	c.mu.Lock()
	if len(c.pending) >= purgePending {
		c.pending = c.pending[1:]
		c.log().Warn("cluster: purge queue full; the oldest queued purge is dropped")
	}
	c.pending = append(c.pending, msg)
	c.mu.Unlock()
	clusterPurgesTotal.WithLabelValues("queued").Inc()
}

// replayPurges sends the purges queued while degraded, on rejoin.
func (c *cluster) replayPurges() {
	c.mu.Lock()
	pending := c.pending
	c.pending = nil
	zcs := c.zoneList()
	c.mu.Unlock()
	for i, msg := range pending {
		ctx := c.ctx
		_, err := c.purgeL2(ctx, zcs, msg)
		if err == nil {
			_, err = c.publishPurge(ctx, msg)
		}
		if err != nil {
			c.mu.Lock()
			c.pending = append(append([]purgeMessage(nil), pending[i:]...), c.pending...)
			c.mu.Unlock()
			return
		}
		clusterPurgesTotal.WithLabelValues("replayed").Inc()
	}
	if len(pending) > 0 {
		c.log().Info("cluster: purges made while degraded sent", zap.Int("purges", len(pending)))
	}
}

// consumePurges applies the other instances' purges to the local zones, in
// stream order, from the last entry applied: after a dropped connection it
// catches up on what it missed.
func (c *cluster) consumePurges() {
	defer c.wg.Done()
	stream := c.key("purge")
	last := ""
	var seq int64 // the purge sequence number of last (0: not known)
	for c.ctx.Err() == nil {
		if !c.breaker.allow() {
			sleepCtx(c.ctx, probeInterval)
			continue
		}
		if last == "" {
			// Start after the newest entry: this instance's L1 holds nothing older.
			ctx, cancel := context.WithTimeout(c.ctx, time.Second)
			msgs, err := c.rdb.XRevRangeN(ctx, stream, "+", "-", 1).Result()
			var n int64
			if err == nil {
				n, err = c.rdb.Get(ctx, c.key("purge-seq")).Int64()
				if errors.Is(err, redis.Nil) {
					err = nil
				}
			}
			cancel()
			if err != nil {
				sleepCtx(c.ctx, probeInterval)
				continue
			}
			last, seq = "0-0", n
			if len(msgs) > 0 {
				last = msgs[0].ID
				if s, ok := purgeSeq(msgs[0]); ok {
					seq = s
				}
			}
		}
		ctx, cancel := context.WithTimeout(c.ctx, purgeBlock+time.Second)
		streams, err := c.rdb.XRead(ctx, &redis.XReadArgs{Streams: []string{stream, last}, Count: 100, Block: purgeBlock}).Result()
		cancel()
		if errors.Is(err, redis.Nil) {
			continue
		}
		if err != nil {
			if c.ctx.Err() == nil {
				c.observe(err)
				sleepCtx(c.ctx, 100*time.Millisecond)
			}
			continue
		}
		for _, s := range streams {
			var gap bool
			if seq, gap = purgeGap(seq, s.Messages); gap {
				c.softPurgeAll()
			}
			for _, m := range s.Messages {
				c.applyPurge(m)
				last = m.ID
			}
		}
		ctx, cancel = context.WithTimeout(c.ctx, time.Second)
		_ = c.rdb.Set(ctx, c.key("ack", c.id), last, time.Minute).Err()
		cancel()
	}
}

// purgeGap says whether entries are missing between the one numbered seq
// (the last applied; 0 when not known) and msgs, read right after it: the
// stream was trimmed (at purgeStreamLen) past purges this instance never
// read, while it was cut off. It returns the number of the last of msgs.
func purgeGap(seq int64, msgs []redis.XMessage) (last int64, gap bool) {
	last = seq
	for _, m := range msgs {
		n, ok := purgeSeq(m)
		if !ok {
			continue // from an instance that does not number its purges
		}
		if last > 0 && n > last+1 {
			gap = true
		}
		last = max(last, n)
	}
	return last, gap
}

// purgeSeq is a stream entry's number in the fleet's purge sequence.
func purgeSeq(m redis.XMessage) (int64, bool) {
	v, _ := m.Values["n"].(string)
	n, err := strconv.ParseInt(v, 10, 64)
	return n, err == nil && n > 0
}

// softPurgeAll makes every entry of this cluster's zones stale, after purges
// were lost: each is revalidated before its next fresh use, while its stale
// windows keep protecting the origin.
func (c *cluster) softPurgeAll() {
	n := 0
	for _, z := range liveZones() {
		if zc := z.clusterOf(); zc != nil && zc.cl == c {
			n += z.purgeAll(true)
		}
	}
	clusterPurgesTotal.WithLabelValues("gap").Inc()
	c.log().Warn("cluster: purges were trimmed from the stream before this instance read them; every entry is now stale (soft purge)",
		zap.Int("entries", n))
}

// applyPurge applies one stream entry to the local zones of this cluster.
func (c *cluster) applyPurge(m redis.XMessage) {
	raw, _ := m.Values["m"].(string)
	var msg purgeMessage
	if err := json.Unmarshal([]byte(raw), &msg); err != nil || msg.From == c.id {
		return
	}
	n := 0
	for _, z := range liveZones() {
		zc := z.clusterOf()
		if zc == nil || zc.cl != c || (msg.Zone != "" && msg.Zone != z.shape.name) {
			continue
		}
		n += z.purge(msg.URL, msg.Prefix, msg.Host, msg.Tag, msg.Soft)
	}
	clusterPurgesTotal.WithLabelValues("received").Inc()
	if ce := c.log().Check(zapcore.DebugLevel, "cluster: purge received"); ce != nil {
		ce.Write(zap.String("zone", msg.Zone), zap.Int("entries", n), zap.Bool("soft", msg.Soft), zap.String("from", msg.From))
	}
}

package caddymodule

import (
	"encoding/binary"
	"errors"
	"net/http"
	"time"
)

// entry is one stored response. The store holds it encoded; every lookup
// decodes a private copy, so nothing is shared between requests.
type entry struct {
	status         int
	noCache        bool // revalidate before every use (origin no-cache)
	mustRevalidate bool // never serve stale
	softPurged     bool // purged softly: stale from now on, still usable for stale windows

	responseTime  time.Time     // when the origin's answer arrived
	initialAge    time.Duration // RFC 9111 corrected_initial_age
	lifetime      time.Duration
	swr, sie      time.Duration
	fetchDuration time.Duration // how long the origin took; scales early refresh

	vary []string // "name:value" pairs the entry was selected with (secondary key)
	tags []string // surrogate keys, for purge by tag

	header http.Header
	body   []byte
	spare  []string // decoded with the header values: room for the Age value, without a new slice
}

// spareValue returns a one-value slice for a header field, from the room
// decoded with the entry when there is some.
func (e *entry) spareValue(i int, v string) []string {
	if i < len(e.spare) {
		e.spare[i] = v
		return e.spare[i : i+1 : i+1]
	}
	return []string{v}
}

// age is the entry's current age (RFC 9111 §4.2.3).
func (e *entry) age(now time.Time) time.Duration {
	return e.initialAge + max(now.Sub(e.responseTime), 0)
}

// freshFor is how long the entry stays fresh; zero or negative means stale.
func (e *entry) freshFor(now time.Time) time.Duration {
	if e.noCache || e.softPurged {
		return min(e.lifetime-e.age(now), 0)
	}
	return e.lifetime - e.age(now)
}

// staleness is how long past its lifetime the entry is (0 while fresh).
func (e *entry) staleness(now time.Time) time.Duration {
	return max(-e.freshFor(now), 0)
}

// withinStaleWindow says whether a stale entry may still be served for a window.
func (e *entry) withinStaleWindow(now time.Time, window time.Duration) bool {
	if e.mustRevalidate || window <= 0 {
		return false
	}
	return e.staleness(now) < window
}

// keepFor is how long a store should keep the entry: its lifetime plus
// the longest stale window, or a short grace for revalidation when it has validators.
func (e *entry) keepFor() time.Duration {
	keep := e.lifetime - e.initialAge + max(e.swr, e.sie)
	if e.header.Get("ETag") != "" || e.header.Get("Last-Modified") != "" {
		// A validator lets a stale entry be refreshed with a cheap 304.
		keep = max(keep, e.lifetime-e.initialAge+time.Hour)
	}
	return keep
}

const (
	entryVersion  = 2
	kindResponse  = 1
	kindVarySpec  = 2
	flagNoCache   = 1 << 0
	flagMustReval = 1 << 1
	flagSoftPurge = 1 << 2
)

var errCorruptEntry = errors.New("corrupt cache entry")

// encodeEntry lays an entry out as: version, kind, fixed fields, then a meta
// section (vary, tags, headers) whose length is known up front, then the body.
func encodeEntry(e *entry) []byte {
	meta := make([]byte, 0, 256)
	meta = appendStrings(meta, e.vary)
	meta = appendStrings(meta, e.tags)
	meta = binary.AppendUvarint(meta, uint64(len(e.header)))
	values := 0
	for _, vs := range e.header {
		values += len(vs)
	}
	// The total lets decoding slice every header's values out of one array.
	meta = binary.AppendUvarint(meta, uint64(values))
	for k, vs := range e.header {
		meta = appendString(meta, k)
		meta = appendStrings(meta, vs)
	}
	b := make([]byte, 0, 2+2+1+6*8+binary.MaxVarintLen64+len(meta)+len(e.body))
	b = append(b, entryVersion, kindResponse)
	b = binary.BigEndian.AppendUint16(b, uint16(e.status))
	var flags byte
	if e.noCache {
		flags |= flagNoCache
	}
	if e.mustRevalidate {
		flags |= flagMustReval
	}
	if e.softPurged {
		flags |= flagSoftPurge
	}
	b = append(b, flags)
	for _, v := range []int64{e.responseTime.UnixNano(), int64(e.initialAge), int64(e.lifetime),
		int64(e.swr), int64(e.sie), int64(e.fetchDuration)} {
		b = binary.BigEndian.AppendUint64(b, uint64(v))
	}
	b = binary.AppendUvarint(b, uint64(len(meta)))
	b = append(b, meta...)
	return append(b, e.body...)
}

const fixedLen = 2 + 2 + 1 + 6*8

// decodeEntry decodes a response entry. The body aliases b, which the caller
// must own (bigcache's Get returns a fresh copy); the strings are one private copy.
func decodeEntry(b []byte) (*entry, error) {
	if len(b) < fixedLen || b[0] != entryVersion || b[1] != kindResponse {
		return nil, errCorruptEntry
	}
	e := &entry{status: int(binary.BigEndian.Uint16(b[2:]))}
	flags := b[4]
	e.noCache, e.mustRevalidate, e.softPurged = flags&flagNoCache != 0, flags&flagMustReval != 0, flags&flagSoftPurge != 0
	var fixed [6]int64
	for i := range fixed {
		fixed[i] = int64(binary.BigEndian.Uint64(b[5+8*i:]))
	}
	e.responseTime = time.Unix(0, fixed[0])
	e.initialAge, e.lifetime, e.swr, e.sie, e.fetchDuration =
		time.Duration(fixed[1]), time.Duration(fixed[2]), time.Duration(fixed[3]), time.Duration(fixed[4]), time.Duration(fixed[5])
	metaLen, n := binary.Uvarint(b[fixedLen:])
	if n <= 0 || uint64(len(b)-fixedLen-n) < metaLen {
		return nil, errCorruptEntry
	}
	start := fixedLen + n
	r := reader{s: string(b[start : start+int(metaLen)])}
	e.vary = r.strings()
	e.tags = r.strings()
	nh := r.uvarint()
	nv := r.uvarint()
	if r.err || nh > uint64(len(r.s)) || nv > uint64(len(r.s)) {
		return nil, errCorruptEntry
	}
	e.header = make(http.Header, nh)
	values := make([]string, nv+1)
	e.spare = values[nv:]
	for range nh {
		k := r.string()
		n := r.uvarint()
		if r.err || n > uint64(len(values)) {
			return nil, errCorruptEntry
		}
		vs := values[:n:n] // capped: an append by a later handler copies instead of clobbering
		values = values[n:]
		for i := range vs {
			vs[i] = r.string()
		}
		if r.err {
			return nil, errCorruptEntry
		}
		e.header[k] = vs
	}
	e.body = b[start+int(metaLen):]
	return e, nil
}

// varySpec is stored under a URL's primary key when its responses vary:
// it names the request headers that select a variant. gen changes whenever the
// spec is recreated, so variants stored before an invalidation are never found again.
type varySpec struct {
	gen   uint64
	names []string // canonical header names, sorted
}

func encodeVarySpec(s varySpec) []byte {
	b := []byte{entryVersion, kindVarySpec}
	b = binary.BigEndian.AppendUint64(b, s.gen)
	return appendStrings(b, s.names)
}

func decodeVarySpec(b []byte) (varySpec, bool) {
	if len(b) < 10 || b[0] != entryVersion || b[1] != kindVarySpec {
		return varySpec{}, false
	}
	r := reader{s: string(b[10:])}
	s := varySpec{gen: binary.BigEndian.Uint64(b[2:]), names: r.strings()}
	return s, !r.err
}

// entryKind reports the kind byte of an encoded record, or 0.
func entryKind(b []byte) byte {
	if len(b) < 2 || b[0] != entryVersion {
		return 0
	}
	return b[1]
}

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

func appendStrings(b []byte, ss []string) []byte {
	b = binary.AppendUvarint(b, uint64(len(ss)))
	for _, s := range ss {
		b = appendString(b, s)
	}
	return b
}

// reader slices strings out of one string, so decoding allocates once for all of them.
type reader struct {
	s   string
	err bool
}

func (r *reader) uvarint() uint64 {
	var x uint64
	var shift uint
	for i := 0; i < len(r.s) && i < binary.MaxVarintLen64; i++ {
		c := r.s[i]
		if c < 0x80 {
			r.s = r.s[i+1:]
			return x | uint64(c)<<shift
		}
		x |= uint64(c&0x7f) << shift
		shift += 7
	}
	r.err = true
	return 0
}

func (r *reader) string() string {
	n := r.uvarint()
	if r.err || n > uint64(len(r.s)) {
		r.err = true
		return ""
	}
	s := r.s[:n]
	r.s = r.s[n:]
	return s
}

func (r *reader) strings() []string {
	n := r.uvarint()
	if r.err || n > uint64(len(r.s)) {
		r.err = true
		return nil
	}
	if n == 0 {
		return nil
	}
	out := make([]string, n)
	for i := range out {
		out[i] = r.string()
	}
	return out
}

package caddymodule

import (
	"net"
	"slices"
	"strings"
)

// purge applies one purge to the zone: of a URL (its cache key), a path
// prefix (on host, when given), a tag, or, with none of them, everything.
func (z *zone) purge(primary, prefix, host, tag string, soft bool) int {
	switch {
	case primary != "":
		return z.purgeURL(primary, soft)
	case prefix != "":
		return z.purgePrefix(host, prefix, soft)
	case tag != "":
		return z.purgeTag(tag, soft)
	}
	return z.purgeAll(soft)
}

// purgeURL purges one URL's records: its entry, or its vary spec and every
// variant under it.
func (z *zone) purgeURL(primary string, soft bool) int {
	raw, err := z.store.bc.Get(primary)
	if err != nil {
		return 0
	}
	z.hints.clear(primary)
	if entryKind(raw) != kindVarySpec {
		return z.store.purge([]string{primary}, soft)
	}
	variants := z.store.collect(func(key string, _ []byte) bool {
		return key != primary && primaryOf(key) == primary
	})
	n := z.store.purge(variants, soft)
	if !soft {
		z.store.remove(primary)
	}
	return n
}

// purgePrefix purges every URL whose path starts with prefix, on host when
// host is not empty (compared without case; a host without a port matches it
// on every port).
func (z *zone) purgePrefix(host, prefix string, soft bool) int {
	host = strings.ToLower(host)
	_, _, noPort := net.SplitHostPort(host)
	anyPort := host != "" && noPort != nil
	keys := z.store.collect(func(key string, raw []byte) bool {
		if soft && entryKind(raw) != kindResponse {
			return false
		}
		p := primaryOf(key)
		slash := strings.IndexByte(p, '/')
		if slash < 0 {
			return false
		}
		h := p[:slash]
		onHost := host == "" || h == host || (anyPort && strings.HasPrefix(h, host+":"))
		return onHost && strings.HasPrefix(p[slash:], prefix)
	})
	return z.store.purge(keys, soft)
}

// purgeTag purges the entries carrying a surrogate key.
func (z *zone) purgeTag(tag string, soft bool) int {
	keys := z.store.collect(func(_ string, raw []byte) bool {
		if entryKind(raw) != kindResponse {
			return false
		}
		e, err := decodeEntry(raw)
		return err == nil && slices.Contains(e.tags, tag)
	})
	return z.store.purge(keys, soft)
}

// purgeAll empties the zone (hard) or marks every entry stale (soft).
func (z *zone) purgeAll(soft bool) int {
	z.hints.reset()
	if !soft {
		return z.store.reset()
	}
	keys := z.store.collect(func(_ string, raw []byte) bool { return entryKind(raw) == kindResponse })
	return z.store.purge(keys, soft)
}

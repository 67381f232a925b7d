package caddymodule

import (
	"strconv"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/dustin/go-humanize"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("shield", parseCaddyfile)
	// Before reverse_proxy (and after encode and auth, which Caddy orders earlier),
	// so users need no order line.
	httpcaddyfile.RegisterDirectiveOrder("shield", httpcaddyfile.Before, "reverse_proxy")
}

func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	s := new(Handler)
	err := s.UnmarshalCaddyfile(h.Dispenser)
	return s, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	shield {
//	    zone <name>
//	    memory <size>
//	    max_object_size <size>
//	    origin_rate <n>/<s|m|h>
//	    origin_burst <n>
//	    origin_concurrency <n>
//	    tag_header <field>
//	    cluster on|off
//	    # rule options, as defaults:
//	    ttl <duration>
//	    stale_while_revalidate <duration>
//	    stale_if_error <duration>
//	    bypass
//	    origin_cache_control honor|ignore
//	    client_cache_control honor|ignore
//	    max_wait <duration>
//	    origin_timeout <duration>
//	    rule <path patterns...> {
//	        <rule options>
//	    }
//	}
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive's name
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := map[string]bool{}
	for d.NextBlock(0) {
		name := d.Val()
		if name == "rule" {
			rule, err := parseRule(d)
			if err != nil {
				return err
			}
			h.Rules = append(h.Rules, rule)
			continue
		}
		if seen[name] {
			return d.Errf("%s already specified", name)
		}
		seen[name] = true
		var err error
		switch name {
		case "zone":
			h.Zone, err = oneArg(d)
		case "memory":
			h.Memory, err = sizeArg(d)
		case "max_object_size":
			h.MaxObjectSize, err = sizeArg(d)
		case "origin_rate":
			if h.OriginRate, err = oneArg(d); err == nil {
				if _, perr := parseRate(h.OriginRate); perr != nil {
					err = d.Err(perr.Error())
				}
			}
		case "origin_burst":
			h.OriginBurst, err = positiveIntArg(d)
		case "origin_concurrency":
			h.OriginConcurrency, err = positiveIntArg(d)
		case "tag_header":
			h.TagHeader, err = oneArg(d)
		case "cluster": // cluster mode (cluster.go)
			h.Cluster, err = choiceArg(d, "on", "off")
		default:
			var known bool
			known, err = parseRuleOption(d, &h.RuleOptions)
			if err == nil && !known {
				err = d.Errf("unrecognized subdirective %q", name)
			}
		}
		if err != nil {
			return err
		}
	}
	if h.Bypass != nil && *h.Bypass && h.TTL != nil {
		return d.Err("ttl cannot be set together with bypass")
	}
	return nil
}

// parseRule reads `rule <patterns...> { <rule options> }`.
func parseRule(d *caddyfile.Dispenser) (Rule, error) {
	var rule Rule
	for d.NextArg() {
		rule.Path = append(rule.Path, d.Val())
	}
	if len(rule.Path) == 0 {
		return rule, d.Err("rule needs at least one path pattern")
	}
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		if seen[name] {
			return rule, d.Errf("%s already specified in this rule", name)
		}
		seen[name] = true
		known, err := parseRuleOption(d, &rule.RuleOptions)
		if err != nil {
			return rule, err
		}
		if !known {
			switch name {
			case "zone", "memory", "max_object_size", "origin_rate", "origin_burst", "origin_concurrency", "tag_header", "cluster", "rule":
				return rule, d.Errf("%s belongs to the shield block, not to a rule", name)
			}
			return rule, d.Errf("unrecognized rule subdirective %q", name)
		}
	}
	if rule.Bypass != nil && *rule.Bypass && rule.TTL != nil {
		return rule, d.Err("ttl cannot be set on a bypass rule")
	}
	return rule, nil
}

// parseRuleOption reads one rule option into o; known is false for other names.
func parseRuleOption(d *caddyfile.Dispenser, o *RuleOptions) (known bool, err error) {
	switch d.Val() {
	case "ttl":
		o.TTL, err = durationArg(d)
	case "stale_while_revalidate":
		o.StaleWhileRevalidate, err = durationArg(d)
	case "stale_if_error":
		o.StaleIfError, err = durationArg(d)
	case "max_wait":
		o.MaxWait, err = durationArg(d)
		if err == nil && *o.MaxWait <= 0 {
			err = d.Err("max_wait must be positive")
		}
	case "origin_timeout":
		o.OriginTimeout, err = durationArg(d)
		if err == nil && *o.OriginTimeout <= 0 {
			err = d.Err("origin_timeout must be positive")
		}
	case "bypass":
		if d.NextArg() {
			return true, d.ArgErr()
		}
		t := true
		o.Bypass = &t
	case "origin_cache_control":
		o.OriginCacheControl, err = choiceArg(d, "honor", "ignore")
	case "client_cache_control":
		o.ClientCacheControl, err = choiceArg(d, "honor", "ignore")
	default:
		return false, nil
	}
	return true, err
}

func oneArg(d *caddyfile.Dispenser) (string, error) {
	if !d.NextArg() {
		return "", d.ArgErr()
	}
	v := d.Val()
	if d.NextArg() {
		return "", d.ArgErr()
	}
	return v, nil
}

func durationArg(d *caddyfile.Dispenser) (*caddy.Duration, error) {
	name := d.Val()
	v, err := oneArg(d)
	if err != nil {
		return nil, err
	}
	dur, err := caddy.ParseDuration(v)
	if err != nil {
		return nil, d.Errf("invalid %s %q: %v", name, v, err)
	}
	if dur < 0 {
		return nil, d.Errf("invalid %s %q: cannot be negative", name, v)
	}
	cd := caddy.Duration(dur)
	return &cd, nil
}

func sizeArg(d *caddyfile.Dispenser) (int64, error) {
	name := d.Val()
	v, err := oneArg(d)
	if err != nil {
		return 0, err
	}
	n, err := humanize.ParseBytes(v)
	if err != nil || n == 0 || n > 1<<50 {
		return 0, d.Errf("invalid %s %q: want a size such as 256MiB", name, v)
	}
	return int64(n), nil
}

func positiveIntArg(d *caddyfile.Dispenser) (int, error) {
	name := d.Val()
	v, err := oneArg(d)
	if err != nil {
		return 0, err
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		return 0, d.Errf("invalid %s %q: want a positive whole number", name, v)
	}
	return n, nil
}

func choiceArg(d *caddyfile.Dispenser, choices ...string) (string, error) {
	name := d.Val()
	v, err := oneArg(d)
	if err != nil {
		return "", err
	}
	for _, c := range choices {
		if v == c {
			return v, nil
		}
	}
	return "", d.Errf("invalid %s %q: want %s or %s", name, v, choices[0], choices[1])
}

// Interface guards
var _ caddyfile.Unmarshaler = (*Handler)(nil)

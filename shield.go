// Package shield registers the Shield Caddy module, so that
// `xcaddy build --with github.com/shieldcache/shield` works: xcaddy imports a
// module's root package. The plugin itself lives in package caddymodule.
package shield

import (
	_ "github.com/shieldcache/shield/caddymodule"
)

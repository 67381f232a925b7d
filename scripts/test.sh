#!/usr/bin/env bash
# Runs every test of the project: vet, the Go tests with the race detector
# (unit tests and integration tests against a real Caddy), then the public
# HTTP cache conformance suite against Caddy+Shield, failing when its required
# score drops below the floor kept in integration/conformance/floor.
# This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "== go vet"
go vet ./...

echo "== go test -race"
go test -race -count=1 -timeout 20m ./...

if [ -x integration/conformance/run.sh ]; then
	echo "== RFC 9111 conformance (http-cache-tests)"
	integration/conformance/run.sh --check-floor
fi

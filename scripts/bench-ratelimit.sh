#!/usr/bin/env bash
# Cost of one rate-limit check against a local Redis (docs/benchmarks.md,
# "Rate-limit check"). Usage: scripts/bench-ratelimit.sh [REDIS_URL] [CHECKS]
# Uses Redis db 15 by default and deletes its keys afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
url="${1:-redis://127.0.0.1:6379/15}"
checks="${2:-200000}"
echo "# $(date -u +%FT%TZ) $(nproc) cores, $(redis-cli -u "$url" info server 2>/dev/null | grep -m1 redis_version | tr -d '\r')"
exec cargo run --release -q -p gateway --example bench_rate_limit -- "$url" "$checks"

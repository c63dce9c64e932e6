#!/usr/bin/env bash
# Fails when a Rust or Lua source file is over 800 lines or has a line over
# 200 characters (issue 17: files doing one job, readable lines).
set -euo pipefail
cd "$(dirname "$0")/.."
bad=0
while IFS= read -r f; do
  n=$(wc -l < "$f")
  if [ "$n" -gt 800 ]; then echo "$f: $n lines (max 800)"; bad=1; fi
  long=$(awk 'length($0) > 200 { print FNR }' "$f" | head -3 | tr '\n' ' ')
  if [ -n "$long" ]; then echo "$f: lines over 200 characters: $long"; bad=1; fi
done < <(git ls-files '*.rs' '*.lua')
[ "$bad" -eq 0 ] && echo "source limits: every file ≤ 800 lines, every line ≤ 200 characters"
exit "$bad"

#!/usr/bin/env bash
# Model load time, as `generate --json` reports it (`load_ms`: weights and tokenizer, until ready), cold (the
# page cache dropped first: needs root) and warm, three rounds each, then the process's peak RSS.
# Usage: scripts/load-time.sh BINARY MODEL...
set -euo pipefail
bin=$1; shift
ms() { "$bin" generate --model "$1" --prompt Hi --max-tokens 1 --json --threads 2 |
  python3 -c "import json,sys; print(round(json.load(sys.stdin)['timings']['load_ms']))"; }
for m in "$@"; do
  cold=(); warm=()
  for _ in 1 2 3; do
    sync; echo 3 > /proc/sys/vm/drop_caches
    cold+=("$(ms "$m")")
    warm+=("$(ms "$m")")
  done
  rss=$(/usr/bin/time -f %M "$bin" generate --model "$m" --prompt Hi --max-tokens 1 --json --threads 2 2>&1 >/dev/null | tail -1)
  echo "$m cold ${cold[*]} warm ${warm[*]} maxrss_kb $rss"
done

#!/usr/bin/env bash
# A/B of two mlx-serving binaries as servers, with our `bench` (interleaved rounds, ratios B / A).
# Two servers side by side on a 2-vCPU VM differed by up to ~8 % with the same binary depending on start order
# and port, so this runs two sessions with the order (and ports) swapped and prints both; quote their
# geometric mean.
# Usage: [MODEL=...] [CONC=1,8] [ROUNDS=2] [A_FLAGS=...] [B_FLAGS=...] [SERVER_CPUS=2,3 CLIENT_CPUS=4-7]
#        scripts/ab-serve.sh BIN_A BIN_B
# (SERVER_CPUS / CLIENT_CPUS: `taskset` lists pinning both servers, and the bench client, to those CPUs.)
set -euo pipefail
a="$(realpath "$1")"; b="$(realpath "$2")"
[ -z "${MODEL:-}" ] || MODEL="$(realpath "$MODEL")"
cd "$(dirname "$0")/.."
model="${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
pa=""; pb=""
trap 'kill $pa $pb 2>/dev/null || true' EXIT
conc="${CONC:-1,8}"; rounds="${ROUNDS:-2}"
serve() { # BIN PORT FLAGS: starts a server in the background, prints its pid
  # shellcheck disable=SC2086  # flags are split on purpose
  if [ -n "${SERVER_CPUS:-}" ]; then
    taskset -c "$SERVER_CPUS" "$1" serve --model "$model" --port "$2" --threads 2 --max-num-seqs 16 --log-level warn $3 >/dev/null 2>&1 &
  else
    "$1" serve --model "$model" --port "$2" --threads 2 --max-num-seqs 16 --log-level warn $3 >/dev/null 2>&1 &
  fi
  echo $!
}
client() { if [ -n "${CLIENT_CPUS:-}" ]; then taskset -c "$CLIENT_CPUS" "$@"; else "$@"; fi; }
for p in 8181 8182; do
  ! curl -s "http://127.0.0.1:$p/" >/dev/null || { echo "port $p is already in use" >&2; exit 1; }
done
wait_up() { for _ in $(seq 300); do curl -sf "http://127.0.0.1:$1/v1/models" >/dev/null && return; sleep 0.2; done; echo "server on $1 did not start" >&2; exit 1; }
wait_down() { for _ in $(seq 300); do curl -s "http://127.0.0.1:$1/" >/dev/null || return 0; sleep 0.2; done; echo "server on $1 did not stop" >&2; exit 1; }
for order in AB BA; do
  if [ "$order" = AB ]; then pa=$(serve "$a" 8181 "${A_FLAGS:-}"); wait_up 8181; pb=$(serve "$b" 8182 "${B_FLAGS:-}"); wait_up 8182; ua=8181; ub=8182
  else pb=$(serve "$b" 8181 "${B_FLAGS:-}"); wait_up 8181; pa=$(serve "$a" 8182 "${A_FLAGS:-}"); wait_up 8182; ua=8182; ub=8181; fi
  echo "## $order started first (A on $ua, B on $ub)"
  report=$(client "$b" bench --url "http://127.0.0.1:$ua" --url "http://127.0.0.1:$ub" --concurrency "$conc" \
    --max-tokens 128 --ignore-eos --num-prompts 16 --rounds "$rounds" --warmup 2 --markdown)
  grep -E "^\| (load|concurrency .*/ )" <<<"$report"
  kill "$pa" "$pb"
  # The servers are not this shell's children (started in command substitutions): wait for the ports to close.
  wait_down 8181; wait_down 8182
  pa=""; pb=""
done

#!/usr/bin/env bash
# Serving throughput and TTFT of `mlx-serving serve --device cuda` against llama.cpp's `llama-server` (CUDA build)
# on the same GGUF file, at several concurrency levels (#21; run on the GPU machine). Each level starts both
# servers fresh with as many sequences / slots as the level and the same context per sequence, then drives them in
# turn with `mlx-serving bench` (chat prompts from the built-in set, greedy, MAX_TOKENS output tokens, both servers'
# usage counts), writing a JSON report and a markdown table per level into OUT_DIR.
#
# usage: scripts/gpu-serving-bench.sh MLX_SERVING LLAMA_SERVER MODEL.gguf OUT_DIR [CONCURRENCY...]   (default 1 16 64 256)
# env: MAX_TOKENS (128), CTX_PER_SEQ (1024: llama-server's -c is levels × this), KV_MB (our KV cache, 32768),
#      ROUNDS (2), DEVICE (cuda; `cpu` tries the script on a machine without a GPU, with NGL=0), NGL (99)
set -euo pipefail
ms=$1 llama=$2 model=$3 out=$4
shift 4
levels=${*:-1 16 64 256}
max_tokens=${MAX_TOKENS:-128} ctx=${CTX_PER_SEQ:-1024} kv_mb=${KV_MB:-32768} rounds=${ROUNDS:-2}
device=${DEVICE:-cuda} ngl=${NGL:-99}
ours_port=8291 theirs_port=8292
mkdir -p "$out"
pids=()
stop() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }
trap stop EXIT
up() {
  for _ in $(seq 1200); do curl -sf "http://127.0.0.1:$1/health" >/dev/null && return 0; sleep 0.5; done
  echo "the server on port $1 did not come up (logs in $out)" >&2
  return 1
}
for c in $levels; do
  echo "== concurrency $c"
  "$llama" -m "$model" --host 127.0.0.1 --port $theirs_port -ngl "$ngl" -np "$c" -c $((c * ctx)) --no-webui \
    > "$out/llama-server-c$c.log" 2>&1 &
  pids+=($!)
  "$ms" serve --model "$model" --device "$device" --port $ours_port --max-num-seqs "$c" --kv-cache-mb "$kv_mb" \
    --log-level warn > "$out/mlx-serving-c$c.log" 2>&1 &
  pids+=($!)
  up $theirs_port
  up $ours_port
  prompts=$((c > 16 ? 2 * c : 32))
  "$ms" bench --url "http://127.0.0.1:$theirs_port" --url "http://127.0.0.1:$ours_port" --concurrency "$c" \
    --max-tokens "$max_tokens" --ignore-eos --num-prompts "$prompts" --rounds "$rounds" --warmup 2 \
    --output "$out/c$c.json" --markdown | tee "$out/c$c.md"
  stop
done

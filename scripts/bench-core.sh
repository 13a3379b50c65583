#!/usr/bin/env bash
# Single-stream prompt (512 tokens) and decode (128 tokens) throughput of `mlx-serving generate` on the
# default model, median of N runs: decode from an empty context (a 1-token prompt, as llama-bench's tg128)
# and decode after the 512-token prompt (llama-bench -d 512). With LLAMA_BENCH=/path/to/llama-bench,
# llama.cpp's numbers from the same machine in the same run.
# Usage: scripts/bench-core.sh [runs] [threads]
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-5}"; threads="${2:-2}"
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
bin=target/release/mlx-serving
[ -x "$bin" ] || cargo build --release
# 51 sentences of 10 tokens plus " Hello there" = exactly 512 prompt tokens with SmolLM2's tokenizer.
prompt="$(python3 -c "print(' '.join(['The quick brown fox jumps over the lazy dog.']*51) + ' Hello there')")"
for i in $(seq "$runs"); do
  "$bin" generate --model "$model" --prompt "$prompt" --max-tokens 128 --ignore-eos --threads "$threads" --json
done | python3 -c '
import json, statistics, sys
rows = [json.loads(l) for l in sys.stdin if l.strip()]
assert all(len(r["prompt_token_ids"]) == 512 and len(r["token_ids"]) == 128 for r in rows)
pp = statistics.median(r["timings"]["prompt_tokens_per_second"] for r in rows)
tg = statistics.median(r["timings"]["decode_tokens_per_second"] for r in rows)
print(f"mlx-serving: prompt {pp:.1f} tok/s (512), decode {tg:.1f} tok/s (128 after the 512-token prompt), median of {len(rows)}")
'
for i in $(seq "$runs"); do
  "$bin" generate --model "$model" --prompt "Hello" --max-tokens 129 --ignore-eos --threads "$threads" --json
done | python3 -c '
import json, statistics, sys
rows = [json.loads(l) for l in sys.stdin if l.strip()]
tg = statistics.median(r["timings"]["decode_tokens_per_second"] for r in rows)
print(f"mlx-serving: decode {tg:.1f} tok/s (128 after a 1-token prompt), median of {len(rows)}")
'
if [ -n "${LLAMA_BENCH:-}" ]; then
  "$LLAMA_BENCH" -m "$model" -t "$threads" -p 512 -n 128 -r "$runs" -o md
  "$LLAMA_BENCH" -m "$model" -t "$threads" -p 0 -n 128 -d 512 -r "$runs" -o md
fi

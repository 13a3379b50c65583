#!/usr/bin/env bash
# Ours vs llama.cpp's llama-bench on one model (MODEL=, default SmolLM2), interleaved round by round (ours,
# llama, ours, ...) so machine drift hits both alike: pp512, tg128, and tg128 after 512 tokens of context.
# Prints each side's medians and the ours/llama ratio per round (median, min–max).
# Usage: LLAMA_BENCH=/path/to/llama-bench [LOAD=N] scripts/vs-llama.sh [rounds] [threads] [extra mlx-serving flags...]
# LOAD=N runs N busy-looping processes for the whole measurement (a competing load, both sides alike).
# MODEL=path measures another GGUF (default: SmolLM2-135M Q4_1). LLAMA_FLAGS="..." go to llama-bench (e.g.
# "--repack 0": no repacked or AMX weights, where its build has them). OURS_MODEL=path gives ours another form
# of the same weights (a Hugging Face or MLX directory) while llama.cpp runs MODEL. BIN=path: another build of
# ours (default target/release/mlx-serving).
set -euo pipefail
cd "$(dirname "$0")/.."
busy=()
trap 'for p in "${busy[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
for _ in $(seq "${LOAD:-0}"); do
  bash -c 'while :; do :; done' &
  busy+=("$!")
done
rounds="${1:-5}"; threads="${2:-2}"; shift $(( $# < 2 ? $# : 2 ))
bin="${BIN:-target/release/mlx-serving}"
[ -x "$bin" ] || cargo build --release
model="${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
ours_model="${OURS_MODEL:-$model}"
[ -n "${LLAMA_BENCH:-}" ] || { echo "set LLAMA_BENCH to llama.cpp's llama-bench" >&2; exit 1; }
prompt="$(python3 -c "print(' '.join(['The quick brown fox jumps over the lazy dog.']*51) + ' Hello there')")"
for i in $(seq "$rounds"); do
  long=$("$bin" generate --model "$ours_model" --prompt "$prompt" --max-tokens 128 --ignore-eos --threads "$threads" --json "$@")
  short=$("$bin" generate --model "$ours_model" --prompt "Hello" --max-tokens 129 --ignore-eos --threads "$threads" --json "$@")
  echo "ours $i $long"
  echo "ours $i $short"
  echo "llama $i $("$LLAMA_BENCH" -m "$model" -t "$threads" -p 512 -n 128 -r 1 -o json ${LLAMA_FLAGS:-} 2>/dev/null | tr -d '\n')"
  echo "llama $i $("$LLAMA_BENCH" -m "$model" -t "$threads" -p 0 -n 128 -d 512 -r 1 -o json ${LLAMA_FLAGS:-} 2>/dev/null | tr -d '\n')"
done | python3 -c '
import json, statistics, sys
runs = {}
for line in sys.stdin:
    who, i, js = line.split(" ", 2)
    r = runs.setdefault((who, int(i)), {})
    v = json.loads(js)
    if who == "ours":
        t = v["timings"]
        if len(v["prompt_token_ids"]) > 64:
            r.update({"pp512": t["prompt_tokens_per_second"], "tg@d512": t["decode_tokens_per_second"]})
        else:
            r["tg128"] = t["decode_tokens_per_second"]
    else:
        for test in v:
            key = "pp512" if test["n_prompt"] == 512 else ("tg@d512" if test.get("n_depth", 0) == 512 else "tg128")
            r[key] = test["avg_ts"]
rounds = sorted({i for _, i in runs})
print("metric      ours tok/s  llama tok/s  ours/llama median  min-max")
for m in ["pp512", "tg128", "tg@d512"]:
    a = [runs[("ours", i)][m] for i in rounds]; b = [runs[("llama", i)][m] for i in rounds]
    rs = [x / y for x, y in zip(a, b)]
    print(f"{m:10} {statistics.median(a):10.1f} {statistics.median(b):12.1f} {statistics.median(rs):17.2f}x  {min(rs):.2f}–{max(rs):.2f}")
'

#!/usr/bin/env bash
# A/B of two mlx-serving binaries on the default model, interleaved run by run (A, B, A, B, ...) so machine
# drift hits both alike: prompt (512 tokens), decode after it, and decode from a 1-token prompt.
# Prints each binary's medians and B/A ratios with their min–max over rounds.
# Usage: [A_FLAGS=...] [B_FLAGS=...] scripts/ab-core.sh BIN_A BIN_B [rounds] [threads]
# (A_FLAGS / B_FLAGS: extra `generate` flags per side, e.g. B_FLAGS="--kv-cache-dtype f16"; MODEL: another GGUF)
set -euo pipefail
cd "$(dirname "$0")/.."
a="$1"; b="$2"; rounds="${3:-5}"; threads="${4:-2}"
model="${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
prompt="$(python3 -c "print(' '.join(['The quick brown fox jumps over the lazy dog.']*51) + ' Hello there')")"
for i in $(seq "$rounds"); do
  for tag in A B; do
    bin="$a"; flags="${A_FLAGS:-}"; [ "$tag" = B ] && { bin="$b"; flags="${B_FLAGS:-}"; }
    # shellcheck disable=SC2086  # flags are split on purpose
    long=$("$bin" generate --model "$model" --prompt "$prompt" --max-tokens 128 --ignore-eos --threads "$threads" --json $flags)
    # shellcheck disable=SC2086
    short=$("$bin" generate --model "$model" --prompt "Hello" --max-tokens 129 --ignore-eos --threads "$threads" --json $flags)
    echo "$tag $i $long"
    echo "$tag $i $short"
  done
done | python3 -c '
import json, statistics, sys
runs = {}
for line in sys.stdin:
    tag, i, js = line.split(" ", 2)
    r = json.loads(js)
    key = "prompt" if len(r["prompt_token_ids"]) > 1 else "short"
    t = r["timings"]
    runs.setdefault((tag, int(i)), {}).update(
        {"pp512": t["prompt_tokens_per_second"], "tg@d512": t["decode_tokens_per_second"]} if key == "prompt"
        else {"tg128": t["decode_tokens_per_second"]})
rounds = sorted({i for _, i in runs})
print("metric       A tok/s   B tok/s  B/A median       min-max")
for m in ["pp512", "tg128", "tg@d512"]:
    a = [runs[("A", i)][m] for i in rounds]; b = [runs[("B", i)][m] for i in rounds]
    rs = [y / x for x, y in zip(a, b)]
    print(f"{m:10} {statistics.median(a):9.1f} {statistics.median(b):9.1f} {statistics.median(rs):10.2f}x {min(rs):6.2f}–{max(rs):.2f}")
'

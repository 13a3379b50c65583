#!/usr/bin/env bash
# Coverage-guided fuzzing (#25) of every parser that reads untrusted bytes: GGUF header, tensor table and
# tokenizer metadata (`gguf`), Hugging Face config / safetensors header / index (`hf_dir`), chat templates with
# hostile sources and messages (`chat_template`), request bodies (`request`) and bench's SSE client (`sse`).
# Each target runs for SECONDS (60) from fuzz/seeds/<target> plus the corpus it grew before (fuzz/corpus,
# not committed), with the format's names from fuzz/dicts/<target>.dict. A crash, a hang (over 10 s for one
# input) or RSS past 2 GiB stops that target; its input is copied to fuzz/regressions/<target>/, which the
# stable test suite replays (crates/*/tests/fuzz_regressions.rs), and the script exits non-zero. Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`);
# FUZZ_SANITIZER=address builds with AddressSanitizer (slower; our code has no unsafe, dependencies do).
#
# Usage: scripts/fuzz.sh [SECONDS] [TARGET ...]
set -uo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(gguf hf_dir chat_template request sse)
cargo +nightly fuzz build -O -s "${FUZZ_SANITIZER:-none}" || exit 1
bin=target/x86_64-unknown-linux-gnu/release
failed=()
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t" "regressions/$t"
  cp -n "seeds/$t"/* "corpus/$t/" 2>/dev/null || true
  echo "== $t: ${secs}s"
  dict=()
  [ -f "dicts/$t.dict" ] && dict=(-dict="dicts/$t.dict")
  if "$bin/$t" "corpus/$t" "${dict[@]}" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=1048576 \
      -artifact_prefix="artifacts/$t/" -print_final_stats=1 >"artifacts/$t.log" 2>&1; then
    grep -E "^stat::(number_of_executed_units|new_units_added)|^#[0-9]+.*DONE" "artifacts/$t.log" | tail -3
  else
    failed+=("$t")
    grep -E "panicked|ERROR|SUMMARY|Test unit written" "artifacts/$t.log" | head -8
    for a in "artifacts/$t"/*; do
      [ -f "$a" ] && cp "$a" "regressions/$t/" && echo "   -> fuzz/regressions/$t/$(basename "$a")"
    done
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: failures in ${failed[*]} (inputs in fuzz/regressions/; logs in fuzz/artifacts/)"
  exit 1
fi
echo "fuzz: ${targets[*]}: no crash, hang or memory blow-up in ${secs}s each"

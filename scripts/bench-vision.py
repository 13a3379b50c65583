#!/usr/bin/env python3
"""Vision encoder time per image and time to first token of a chat with one 512x512 image (#28), ours side by
side with llama.cpp's multimodal server (`llama-server --mmproj`) on the same model, converted with llama.cpp's
own `convert_hf_to_gguf.py` (text model and `--mmproj`, both f32).

Each round sends every server a chat with a fresh 512x512 image (a different picture each time, so neither
server can reuse an earlier encoding), streamed, max_tokens 1; TTFT is the client-side time to the first
content chunk. Encoder time: ours from /metrics (`vision_encoder_seconds` sum / count), llama.cpp's from its
log ("image slice encoded in N ms"). Then the same image again: its TTFT, and whether an encoder ran.

Usage: scripts/bench-vision.py --model models/SmolVLM-rand --gguf TEXT.gguf --mmproj MMPROJ.gguf
         --llama-server .../llama-server [--binary target/release/mlx-serving] [--rounds 5]
"""
import argparse, base64, json, os, re, statistics, subprocess, sys, tempfile, time, urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import harness  # noqa: E402
from harness import metrics, start, start_command, stop  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--binary", default="target/release/mlx-serving")
ap.add_argument("--model", default="models/SmolVLM-rand")
ap.add_argument("--gguf", required=True)
ap.add_argument("--mmproj", required=True)
ap.add_argument("--llama-server", required=True)
ap.add_argument("--rounds", type=int, default=5)
ap.add_argument("--threads", type=int, default=2)
args = ap.parse_args()


def png(seed):
    """A 512x512 PNG: smooth colour fields and a few shapes, different for every seed (no file I/O)."""
    import zlib, struct, random
    r = random.Random(seed)
    cx, cy, rad = r.randint(100, 400), r.randint(100, 400), r.randint(30, 150)
    c1, c2 = [r.randint(0, 255) for _ in range(3)], [r.randint(0, 255) for _ in range(3)]
    rows = []
    for y in range(512):
        row = bytearray([0])
        for x in range(512):
            if (x - cx) ** 2 + (y - cy) ** 2 < rad * rad:
                row += bytes(c1)
            else:
                row += bytes(((c2[0] + x) % 256, (c2[1] + y) % 256, (c2[2] + x + y) % 256))
        rows.append(bytes(row))
    raw = zlib.compress(b"".join(rows), 6)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 512, 512, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def ttft(port, image, model):
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    body = {"model": model, "stream": True, "max_tokens": 1, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe this image."}]}]}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first = None
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            # The first chunk with text (a role-only first chunk does not count).
            if first is None and line.startswith(b"data: {"):
                delta = (json.loads(line[6:]).get("choices") or [{}])[0].get("delta", {})
                if delta.get("content"):
                    first = time.perf_counter() - t0
    return (first if first is not None else time.perf_counter() - t0) * 1e3


def prompt_tokens(port, image, model):
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    body = {"model": model, "max_tokens": 1, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe this image."}]}]}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())["usage"]["prompt_tokens"]


def ours_encoder(port):
    m = metrics(port)
    s = m.get('mlx_serving:vision_encoder_seconds_sum{model_name="vlm"}', 0.0)
    c = m.get('mlx_serving:vision_encoder_seconds_count{model_name="vlm"}', 0)
    return s, c


def llama_encodes(text):
    """Per image slice, llama-server's encoder time (ms): from "encoding mtmd batch" to "decoding image batch"
    (the next step, feeding the slice's embeddings to the text model, is not encoding), from its -lv 4 log."""
    out, start = [], None
    for line in text.splitlines():
        m = re.match(r"\s*(\d+)\.(\d+)\.(\d+)\.(\d+) ", line)
        if not m:
            continue
        t = (int(m[1]) * 60 + int(m[2])) * 1e3 + int(m[3]) + int(m[4]) / 1e3  # minutes.seconds.ms.us
        if "encoding mtmd batch" in line:
            start = t
        elif "decoding image batch" in line and start is not None:
            out.append(t - start)
            start = None
    return out


log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
ours, oport = start(args.binary, ["--model", args.model, "--served-model-name", "vlm", "--threads",
                                  str(args.threads), "--kv-cache-mb", "256", "--log-level", "warn"])
lport = harness.free_port()
llama = start_command([args.llama_server, "-m", args.gguf, "--mmproj", args.mmproj, "--port", str(lport), "-t",
                       str(args.threads), "-c", "4096", "-np", "1", "-lv", "4"], lport, stdout=log,
                      stderr=subprocess.STDOUT,
                      env={**os.environ, "LD_LIBRARY_PATH": os.path.dirname(args.llama_server)})
# Warm-up: one image each (and how many prompt tokens each server makes of it).
tokens = (prompt_tokens(oport, png(10_000), "vlm"), prompt_tokens(lport, png(10_001), "x"))
print(f"prompt tokens for one 512x512 image + text: ours {tokens[0]}, llama.cpp {tokens[1]}")
rows = {"ours": [], "llama.cpp": []}
enc_ours = []
for i in range(args.rounds):
    img = png(i)
    s0, c0 = ours_encoder(oport)
    rows["ours"].append(ttft(oport, img, "vlm"))
    s1, c1 = ours_encoder(oport)
    enc_ours.append((s1 - s0) * 1e3 / max(1, c1 - c0))
    rows["llama.cpp"].append(ttft(lport, png(i + 5000), "x"))
    print(f"round {i}: ours TTFT {rows['ours'][-1]:.0f} ms (encoder {enc_ours[-1]:.0f} ms), "
          f"llama.cpp TTFT {rows['llama.cpp'][-1]:.0f} ms", flush=True)
log.flush()
enc_llama = llama_encodes(open(log.name).read())[5:]
# The same image again.
img = png(0)
s0, c0 = ours_encoder(oport)
again_ours = ttft(oport, img, "vlm")
s1, c1 = ours_encoder(oport)
n_before = len(llama_encodes(open(log.name).read()))
again_llama = ttft(lport, png(5000 + args.rounds - 1), "x")
log.flush()
n_after = len(llama_encodes(open(log.name).read()))
stop(ours)
stop(llama)
med = statistics.median
print(f"\nprompt tokens: ours {tokens[0]}, llama.cpp {tokens[1]}")
print(f"\n| server | TTFT p50 (512x512 image) | encoder per image p50 | same image again: TTFT | encoder runs |")
print("|---|---|---|---|---|")
print(f"| ours | {med(rows['ours']):.0f} ms | {med(enc_ours):.0f} ms | {again_ours:.0f} ms | {int(c1 - c0)} |")
per_image = [sum(enc_llama[i:i + 5]) for i in range(0, len(enc_llama) - 4, 5)]
el = f"{med(per_image):.0f} ms ({med(enc_llama):.0f} ms per slice)" if per_image else "n/a"
print(f"| llama.cpp | {med(rows['llama.cpp']):.0f} ms | {el} | {again_llama:.0f} ms | {n_after - n_before} slices |")
print(f"\nTTFT ratio llama.cpp/ours: {med(rows['llama.cpp']) / med(rows['ours']):.2f}x")

#!/usr/bin/env python3
"""Latency of a response-cache hit (#22), end to end on loopback, for each backend: a greedy chat request
answered once (a miss), then asked again N times in a row (hits), non-streamed and streamed; medians and p99
of the client-side time. Also the same request with the cache off (the engine answers) for scale.

With --llama-server and --litellm, also the peer: LiteLLM's proxy with its Redis cache in front of
llama-server on the same model (a hit is a response carrying `x-litellm-cache-key`).

Usage: scripts/bench-cache.py [BINARY] [MODEL] [--n 300] [--llama-server BIN --litellm BIN]
       (redis needs `redis-server` on PATH; LiteLLM: `pip install 'litellm[proxy]'` in a virtualenv)
"""
import argparse, json, os, socket, statistics, subprocess, sys, tempfile, time, urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import harness  # noqa: E402
from harness import start, start_command, stop  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("binary", nargs="?", default="target/release/mlx-serving")
ap.add_argument("model", nargs="?", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
ap.add_argument("--n", type=int, default=300)
ap.add_argument("--llama-server", help="llama.cpp's llama-server, the peer's backend")
ap.add_argument("--litellm", help="the `litellm` proxy command of a LiteLLM install")
args = ap.parse_args()
COMMON = ["--model", args.model, "--served-model-name", "smol", "--threads", "2", "--kv-cache-mb", "64",
          "--log-level", "warn"]
BODY = {"model": "smol", "messages": [{"role": "user", "content": "Name three colors."}], "max_tokens": 32,
        "temperature": 0}


LITELLM_KEY = "sk-bench-cache-0123456789abcdef"


def once(port, stream, litellm=False):
    body = json.dumps({**BODY, "stream": stream}).encode()
    headers = {"Content-Type": "application/json"}
    if litellm:
        headers["Authorization"] = f"Bearer {LITELLM_KEY}"
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body, headers=headers)
    t0 = time.perf_counter()
    with urllib.request.urlopen(req) as r:
        r.read()
        x = ("hit" if r.headers.get("x-litellm-cache-key") else "miss") if litellm else r.headers.get("x-cache")
    return (time.perf_counter() - t0) * 1e3, x


def measure(port, n, stream, litellm=False):
    times, kinds = [], set()
    for _ in range(n):
        t, x = once(port, stream, litellm)
        times.append(t)
        kinds.add(x)
    times.sort()
    return statistics.median(times), times[int(0.99 * (len(times) - 1))], kinds


def redis_server():
    port = harness.free_port()
    p = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    harness.servers.append(p)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return p, port
        except OSError:
            time.sleep(0.05)
    raise SystemExit("redis-server did not start")


rows = []
d = tempfile.mkdtemp(prefix="mlx-serving-bench-cache-")
redis, rport = redis_server()
for name, flags in [("off", []), ("memory", ["--response-cache", "memory"]),
                    ("disk", ["--response-cache", "disk", "--cache-path", d]),
                    ("redis", ["--response-cache", "redis", "--redis-url", f"redis://127.0.0.1:{rport}"])]:
    proc, port = start(args.binary, COMMON + flags)
    once(port, False)
    n = args.n if name != "off" else max(10, args.n // 20)
    for stream in (False, True):
        p50, p99, kinds = measure(port, n, stream)
        rows.append((name, "SSE" if stream else "JSON", n, p50, p99, kinds))
        print(f"{name:>7} {'SSE' if stream else 'JSON':>4}: p50 {p50:.3f} ms, p99 {p99:.3f} ms over {n} ({kinds})", flush=True)
    stop(proc)
if args.llama_server and args.litellm:
    lport = harness.free_port()
    llama = start_command([args.llama_server, "-m", args.model, "--port", str(lport), "-t", "2", "-c", "2048",
                           "-np", "1"], lport, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          env={**os.environ, "LD_LIBRARY_PATH": os.path.dirname(args.llama_server)})
    once(lport, False)
    for stream in (False, True):
        p50, p99, kinds = measure(lport, max(10, args.n // 20), stream)
        rows.append(("llama-server alone", "SSE" if stream else "JSON", max(10, args.n // 20), p50, p99, {None}))
    cfg = os.path.join(d, "litellm.yaml")
    with open(cfg, "w") as f:
        f.write(f"""model_list:
  - model_name: smol
    litellm_params: {{model: openai/smol, api_base: "http://127.0.0.1:{lport}/v1", api_key: none}}
litellm_settings:
  cache: true
  cache_params: {{type: redis, host: 127.0.0.1, port: {rport}}}
""")
    pport = harness.free_port()
    env = {**os.environ, "LITELLM_MASTER_KEY": LITELLM_KEY, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    proxy = start_command([args.litellm, "--config", cfg, "--port", str(pport), "--host", "127.0.0.1"], pport,
                          health="/health/liveliness", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          env=env)
    for stream in (False, True):
        once(pport, stream, True)
        p50, p99, kinds = measure(pport, args.n, stream, True)
        rows.append(("LiteLLM redis -> llama-server", "SSE" if stream else "JSON", args.n, p50, p99, kinds))
        print(f"LiteLLM {'SSE' if stream else 'JSON':>4}: p50 {p50:.3f} ms, p99 {p99:.3f} ms over {args.n} ({kinds})",
              flush=True)
    stop(proxy)
    stop(llama)
redis.kill()
print("\n| cache | response | requests | p50 ms | p99 ms | x-cache |\n|---|---|---|---|---|---|")
for name, kind, n, p50, p99, kinds in rows:
    print(f"| {name} | {kind} | {n} | {p50:.3f} | {p99:.3f} | {', '.join(sorted(str(k) for k in kinds))} |")

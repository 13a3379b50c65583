#!/usr/bin/env python3
"""Latency of a response-cache hit (#22), end to end on loopback, for each backend: a greedy chat request
answered once (a miss), then asked again N times in a row (hits), non-streamed and streamed; medians and p99
of the client-side time. Also the same request with the cache off (the engine answers) for scale.

Usage: scripts/bench-cache.py [BINARY] [MODEL] [--n 300]   (redis needs `redis-server` on PATH)
"""
import argparse, json, os, socket, statistics, subprocess, sys, tempfile, time, urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import harness  # noqa: E402
from harness import start, stop  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("binary", nargs="?", default="target/release/mlx-serving")
ap.add_argument("model", nargs="?", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
ap.add_argument("--n", type=int, default=300)
args = ap.parse_args()
COMMON = ["--model", args.model, "--served-model-name", "smol", "--threads", "2", "--kv-cache-mb", "64",
          "--log-level", "warn"]
BODY = {"model": "smol", "messages": [{"role": "user", "content": "Name three colors."}], "max_tokens": 32,
        "temperature": 0}


def once(port, stream):
    body = json.dumps({**BODY, "stream": stream}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req) as r:
        r.read()
        x = r.headers.get("x-cache")
    return (time.perf_counter() - t0) * 1e3, x


def measure(port, n, stream):
    times, kinds = [], set()
    for _ in range(n):
        t, x = once(port, stream)
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
redis.kill()
print("\n| cache | response | requests | p50 ms | p99 ms | x-cache |\n|---|---|---|---|---|---|")
for name, kind, n, p50, p99, kinds in rows:
    print(f"| {name} | {kind} | {n} | {p50:.3f} | {p99:.3f} | {', '.join(sorted(str(k) for k in kinds))} |")

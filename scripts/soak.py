#!/usr/bin/env python3
"""Soak and overload: `mlx-serving serve` under twice its capacity for a while, with a mix of streaming and
non-streaming, cancelled, oversized and malformed requests (loopback only, bounded counts).

Usage: scripts/soak.py BINARY MODEL [--minutes 10] [--warmup 60] [--json out.json] [-- extra serve flags]

Capacity is the engine's batch (`--max-num-seqs`, 8 here) plus its queue (`--max-waiting-requests`, 8): the
load is twice that many clients, each sending its next request as soon as the last one ends, so the server
always has more than it may take and must refuse some (429 with Retry-After). Each client picks:
  40 % streamed chat, 25 % non-streamed completion, 10 % streamed request dropped after 3 chunks,
  10 % oversized (a prompt past the context, or a body past max_body_bytes), 10 % malformed (broken JSON,
  wrong types, unknown fields), 5 % with prompt logprobs.
Once a second: /health (must be 200), the server's RSS (/proc), KV-cache usage and queue from /metrics.

Refused clients wait as told by Retry-After (at most 1 s, jittered) before their next request, as real clients do.
Pass: every answer is a 200, a 4xx, or a 429/503 with Retry-After (no 5xx, no connection error); RSS under load
flat within 5 % (the median of the load's last minute against the minute after the warm-up); KV usage back to 0 and nothing running or waiting once the load stops;
/health 200 at every sample; p99 TTFT of the admitted streamed requests reported (and under 60 s).
Prints the figures (requests by status, RSS at start/end, TTFT p50/p99) and exits 1 on a failed criterion.
"""
import argparse, http.client, json, os, random, socket, statistics, subprocess, sys, threading, time, urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("binary")
ap.add_argument("model")
ap.add_argument("--minutes", type=float, default=10.0)
ap.add_argument("--warmup", type=float, default=60.0, help="seconds before the RSS baseline")
ap.add_argument("--json", help="write the figures here")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("serve_args", nargs="*", help="extra flags for serve (after --)")
a = ap.parse_args()

MAX_SEQS, MAX_WAITING, CTX_MB = 8, 8, 64


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


port = free_port()
cmd = [a.binary, "serve", "--model", a.model, "--served-model-name", "m", "--host", "127.0.0.1", "--port", str(port),
       "--max-num-seqs", str(MAX_SEQS), "--max-waiting-requests", str(MAX_WAITING), "--kv-cache-mb", str(CTX_MB),
       "--log-level", "warn"] + a.serve_args
server = subprocess.Popen(cmd)
try:
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    break
        except Exception:
            if server.poll() is not None:
                sys.exit(f"the server exited with {server.returncode}")
            time.sleep(0.1)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models/m", timeout=5) as r:
        max_len = json.load(r)["max_model_len"]
except BaseException:
    server.kill()
    raise

lock = threading.Lock()
statuses = {}  # kind -> {status: count}
violations = []  # (kind, status, why)
ttfts = []
stop_at = time.time() + a.minutes * 60
running = True

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly box jumping frogs".split()


def record(kind, status, headers=None, why=None):
    with lock:
        statuses.setdefault(kind, {}).setdefault(str(status), 0)
        statuses[kind][str(status)] += 1
        bad = None
        if isinstance(status, str):
            bad = f"no answer ({status})"
        elif status >= 500 and status != 503:
            bad = f"{status}"
        elif status in (429, 503) and not (headers or {}).get("retry-after"):
            bad = f"{status} without Retry-After"
        if bad and len(violations) < 100:
            violations.append((kind, bad, why))


def request(method, path, body=None, raw=None, timeout=300, stream=False, drop_after=None):
    """(status, headers, first-token seconds or None); raw: bytes sent as the body as they are."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t0 = time.time()
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        try:
            c.request(method, path, body=data, headers={"content-type": "application/json"})
        except (BrokenPipeError, ConnectionResetError):
            # The server answered before the whole body went out (an oversized body is refused from its
            # Content-Length) and closed: its answer may still be there to read.
            pass
        r = c.getresponse()
        headers = {k.lower(): v for k, v in r.getheaders()}
        first = None
        if stream and r.status == 200:
            chunks = 0
            for line in r:
                if line.startswith(b"data:") and b'"choices"' in line:
                    if first is None and (b'"text":"' in line and b'"text":""' not in line or b'"content":"' in line and b'"content":""' not in line):
                        first = time.time() - t0
                    chunks += 1
                    if drop_after and chunks >= drop_after:
                        c.close()  # the client leaves mid-stream
                        return r.status, headers, first
                if line.startswith(b"data: [DONE]"):
                    break
        else:
            r.read()
        return r.status, headers, first
    except (OSError, http.client.HTTPException) as e:
        return type(e).__name__, {}, None
    finally:
        c.close()


def prompt(rng, words):
    return " ".join(rng.choice(WORDS) for _ in range(words))


def backoff(rng, headers):
    """A refused client waits as told (Retry-After), at most a second, with jitter, as real clients do."""
    retry = (headers or {}).get("retry-after")
    if retry:
        time.sleep(min(float(retry), 1.0) * rng.uniform(0.5, 1.0))


def client(i):
    rng = random.Random(a.seed * 1000 + i)
    h = None
    while running and time.time() < stop_at:
        backoff(rng, h)
        h = None
        x = rng.random()
        if x < 0.40:
            body = {"model": "m", "messages": [{"role": "user", "content": prompt(rng, rng.randint(5, 200))}],
                    "max_tokens": rng.randint(16, 128), "stream": True, "temperature": 0.8, "seed": rng.randint(0, 9)}
            st, h, first = request("POST", "/v1/chat/completions", body, stream=True)
            record("stream", st, h)
            if st == 200 and first is not None:
                with lock:
                    ttfts.append(first)
        elif x < 0.65:
            body = {"model": "m", "prompt": prompt(rng, rng.randint(5, 300)), "max_tokens": rng.randint(8, 64)}
            st, h, _ = request("POST", "/v1/completions", body)
            record("complete", st, h)
        elif x < 0.75:
            body = {"model": "m", "prompt": prompt(rng, 50), "max_tokens": 400, "stream": True, "ignore_eos": True}
            st, h, _ = request("POST", "/v1/completions", body, stream=True, drop_after=3)
            record("cancelled", st, h)
        elif x < 0.85:
            if rng.random() < 0.5:
                body = {"model": "m", "prompt": [1] * (max_len + 10), "max_tokens": 4}
                st, h, _ = request("POST", "/v1/completions", body)
            else:
                st, h, _ = request("POST", "/v1/completions", raw=b'{"model": "m", "prompt": "' + b"x" * (9 << 20) + b'"}')
            record("oversized", st, h)
        elif x < 0.95:
            bad = rng.choice([b'{"model": "m", "prompt": ', b'{"model": "m", "prompt": "hi", "max_tokens": "lots"}',
                              b'{"model": "m", "prompt": "hi", "temperature": -3}', b'[1, 2, 3]',
                              b'{"model": "m", "messages": [{"role": "wizard", "content": "x"}]}',
                              b'{"model": "m", "prompt": "hi", "frobnicate": true}', b"\xff\xfe not utf-8"])
            path = rng.choice(["/v1/completions", "/v1/chat/completions"])
            st, h, _ = request("POST", path, raw=bad)
            record("malformed", st, h)
        else:
            body = {"model": "m", "prompt": prompt(rng, rng.randint(20, 300)), "max_tokens": 2, "echo": True, "logprobs": 1}
            st, h, _ = request("POST", "/v1/completions", body)
            record("prompt_logprobs", st, h)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


samples = []  # (t, health status, rss KiB, kv usage, running, waiting)


def sample():
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            health = r.status
    except urllib.error.HTTPError as e:
        health = e.code
    except Exception as e:  # noqa: BLE001 - any failure to answer is a failed health sample
        health = type(e).__name__
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            m = r.read().decode()
    except Exception:  # noqa: BLE001
        m = ""
    return (time.time(), health, rss_kib(server.pid), metric(m, "mlx_serving:kv_cache_usage_perc"),
            metric(m, "mlx_serving:num_requests_running"), metric(m, "mlx_serving:num_requests_waiting"))


clients = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(2 * (MAX_SEQS + MAX_WAITING))]
t_start = time.time()
for t in clients:
    t.start()
try:
    while time.time() < stop_at:
        s = sample()
        samples.append(s)
        time.sleep(1)
finally:
    running = False
for t in clients:
    t.join(timeout=600)
# Drained: nothing running or waiting, no KV block held.
drained = None
for _ in range(30):
    s = sample()
    samples.append(s)
    if s[3] == 0 and s[4] == 0 and s[5] == 0:
        drained = s
        break
    time.sleep(1)
end_rss = rss_kib(server.pid)
server.terminate()
server.wait(timeout=60)

total = {}
for kind in statuses.values():
    for st, n in kind.items():
        total[st] = total.get(st, 0) + n
ttfts.sort()
pct = lambda p: ttfts[min(len(ttfts) - 1, int(p * len(ttfts)))] if ttfts else None  # noqa: E731
unhealthy = [s for s in samples if s[1] != 200]
# RSS under load: the median of the minute after the warm-up against the median of the load's last minute
# (single samples swing with the bodies in flight).
loaded = [x for x in samples if x[0] <= stop_at]
first_min = [x[2] for x in loaded if a.warmup <= x[0] - t_start < a.warmup + 60] or [loaded[0][2]]
last_min = [x[2] for x in loaded if x[0] >= stop_at - 60] or [loaded[-1][2]]
baseline, late = statistics.median(first_min), statistics.median(last_min)
growth = (late - baseline) / baseline
report = {
    "minutes": a.minutes, "clients": len(clients), "max_num_seqs": MAX_SEQS, "max_waiting_requests": MAX_WAITING,
    "requests": sum(total.values()), "by_status": total, "by_kind": statuses,
    "rss_kib": {"after_warmup_median": baseline, "last_minute_median": late, "after_drain": end_rss,
                "max": max(s[2] for s in samples), "growth": round(growth, 4)},
    "ttft_s": {"p50": pct(0.5), "p99": pct(0.99), "admitted_streams": len(ttfts)},
    "health_samples": len(samples), "health_not_200": len(unhealthy),
    "kv_usage_max": max(s[3] for s in samples), "drained": drained is not None,
    "violations": violations[:20],
}
print(json.dumps(report, indent=1))
if a.json:
    with open(a.json, "w") as f:
        json.dump(report, f, indent=1)
fails = []
if violations:
    fails.append(f"{len(violations)} answers outside 200/4xx/429+503 with Retry-After")
if abs(growth) > 0.05:
    fails.append(f"RSS under load moved {growth:+.1%} after the warm-up")
if drained is None:
    fails.append("KV usage or the queues did not return to 0")
if unhealthy:
    fails.append(f"/health not 200 at {len(unhealthy)} samples")
if ttfts and pct(0.99) > 60:
    fails.append(f"TTFT p99 {pct(0.99):.1f} s")
print("soak: " + ("PASS" if not fails else "FAIL: " + "; ".join(fails)))
sys.exit(1 if fails else 0)

#!/usr/bin/env python3
"""The fleet router (#23): `mlx-serving router` in front of three real `mlx-serving serve` instances (SmolLM2).

Through the router with the official `openai` client: `/v1/models` lists the fleet's model, greedy answers
(chat and completions, streamed and not) equal an instance's own; `round_robin` spreads evenly,
`consistent_hash` keeps each user on one instance; under a steady concurrent load an instance killed with
SIGKILL fails no non-streamed request (they are retried elsewhere), leaves the healthy set, and rejoins when
restarted on its port; a stream whose instance dies mid-way ends with an error event; an unknown model is a
404; with no instance alive, 503 with Retry-After. With a real redis-server: instances started with
`serve --register` join a router that has no static backends, a killed one leaves within its entry's expiry,
a restarted one rejoins, a cleanly stopped one leaves at once. An SLO (TTFT p95) over SmolLM2 and
Qwen2.5-0.5B instances behind one name: missed, the slow instance degraded to a tenth of the traffic,
low-priority requests shed with 429, the webhook called, /admin/slo and /metrics telling it.

cache_aware over round_robin on 4 shared documents: a higher prefix-cache hit rate on the instances.
Experiments (a second router): a canary serving a slower model (Qwen2.5-0.5B against SmolLM2) is rolled back
by the t-test on its TTFT or ITL, with the decision in /admin/experiments; an equal canary advances
through its stages to 100 %; a feature flag at 50 % sets a request field for a stable half of the users.

Usage: tests/router.py BINARY MODEL SLOWER_MODEL
"""
import json, os, signal, socket, sys, tempfile, threading, time
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import check, free_port, http, metrics, redis_server, start, start_command, stop  # noqa: E402
from openai import OpenAI, NotFoundError  # noqa: E402

binary, model, slower = sys.argv[1], sys.argv[2], sys.argv[3]
SERVE = ["--model", model, "--served-model-name", "smol", "--threads", "1", "--kv-cache-mb", "64",
         "--log-level", "warn"]
INSTANCE = "x-mlx-serving-instance"

instances = [start(binary, SERVE) for _ in range(3)]
urls = [f"http://127.0.0.1:{port}" for _, port in instances]


def router(policy, extra=""):
    d = tempfile.mkdtemp()
    cfg = os.path.join(d, "router.yaml")
    with open(cfg, "w") as f:
        f.write(f"health_interval_seconds: 0.2\nbreaker:\n  failures: 2\n  cooldown_seconds: 1\n{extra}")
    port = free_port()
    args = [binary, "router", "--config", cfg, "--port", str(port), "--policy", policy, "--log-level", "warn"]
    for u in urls:
        args += ["--backend", u]
    proc = start_command(args, port)
    # Until every instance's models are known.
    for _ in range(100):
        _, _, body = http(port, "GET", "/v1/models")
        if body["data"] and body["data"][0]["instances"] == 3:
            break
        time.sleep(0.1)
    return proc, port


def raw(port, path, body, headers=None):
    """(status, headers, parsed body) of one POST, with extra headers."""
    c = HTTPConnection("127.0.0.1", port, timeout=120)
    c.request("POST", path, json.dumps(body), {"Content-Type": "application/json", **(headers or {})})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(data or b"null")


def wait_for(cond, seconds):
    t = time.time()
    while time.time() - t < seconds:
        if cond():
            return time.time() - t
        time.sleep(0.1)
    return None


PROMPTS = ["What is the capital of France?", "Name three colours.", "Count to five.", "Say hello in Spanish."]
lo_proc, lo = router("least_outstanding")
_, _, models = http(lo, "GET", "/v1/models")
check([m["id"] for m in models["data"]] == ["smol"] and models["data"][0]["instances"] == 3,
      f"/v1/models through the router: the fleet's model on 3 instances ({models['data']})")

direct = OpenAI(base_url=f"{urls[0]}/v1", api_key="none")
client = OpenAI(base_url=f"http://127.0.0.1:{lo}/v1", api_key="none")
for p in PROMPTS:
    kw = dict(model="smol", max_tokens=24, temperature=0, messages=[{"role": "user", "content": p}])
    want = direct.chat.completions.create(**kw).choices[0].message.content
    got = client.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                       if c.choices)
    check(got == want == streamed, f"greedy chat through the router = direct, streamed too: {p!r}")
want = direct.completions.create(model="smol", prompt="Once upon a time", max_tokens=16, temperature=0).choices[0].text
got = client.completions.create(model="smol", prompt="Once upon a time", max_tokens=16, temperature=0).choices[0].text
check(got == want, "greedy completion through the router = direct")
try:
    client.chat.completions.create(model="nope", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    check(False, "an unknown model is refused")
except NotFoundError as e:
    check(e.status_code == 404, "an unknown model: 404")
# A client that leaves mid-stream: the instance's request is aborted (its /health load falls to 0).
c = HTTPConnection("127.0.0.1", lo, timeout=120)
c.request("POST", "/v1/chat/completions", json.dumps({
    "model": "smol", "stream": True, "max_tokens": 2000, "ignore_eos": True,
    "messages": [{"role": "user", "content": "Tell me a very long story."}]}), {"Content-Type": "application/json"})
r = c.getresponse()
sport_busy = int(r.getheader(INSTANCE).rsplit(":", 1)[1])
r.readline()
busy = http(sport_busy, "GET", "/health")[2]
r.close()
c.close()
idle = wait_for(lambda: http(sport_busy, "GET", "/health")[2]["running"] == 0, 10)
check(busy["running"] == 1 and idle is not None,
      f"a client leaving mid-stream aborts the instance's request ({busy} then idle after {idle and round(idle, 2)} s)")
st, _, body = raw(lo, "/tokenize", {"model": "smol", "prompt": "hello world"})
check(st == 200 and body["count"] > 0, "/tokenize through the router")

# round_robin: even spread; consistent_hash: each user stays on one instance, users spread.
rr_proc, rr = router("round_robin")
seen = [raw(rr, "/v1/completions", {"model": "smol", "prompt": "hi", "max_tokens": 1})[1][INSTANCE]
        for _ in range(9)]
check(sorted(seen.count(u) for u in urls) == [3, 3, 3], f"round_robin: 3 requests each over 9 ({seen})")
stop(rr_proc)


def head_answer(port, head, wait):
    """The first bytes the server sends after `head` (b"" once it closes; None if nothing within `wait` s)."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(head)
    s.settimeout(wait)
    try:
        return s.recv(64)
    except (socket.timeout, TimeoutError):
        return None
    except ConnectionResetError:
        return b""
    finally:
        s.close()


# The router's own connection limits (the same accept loop as `serve`): heads too large or with too many
# fields get 431, a half-sent head is closed after header_read_timeout_seconds, past max_connections new
# connections wait until one closes.
lim_proc, lim = router("round_robin", "max_header_bytes: 8192\nmax_headers: 20\nheader_read_timeout_seconds: 0.5\n"
                                        "max_connections: 2\n")
big = b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 20000 + b"\r\nConnection: close\r\n\r\n"
many = b"GET /health HTTP/1.1\r\nHost: t\r\n" + b"".join(b"X-H%d: 1\r\n" % i for i in range(30)) + b"\r\n"
ok = b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
check((head_answer(lim, big, 10) or b"").startswith(b"HTTP/1.1 431"), "router: a 20 KB header is a 431")
check((head_answer(lim, many, 10) or b"").startswith(b"HTTP/1.1 431"), "router: 30 header fields are a 431")
check((head_answer(lim, ok, 10) or b"").startswith(b"HTTP/1.1 200"), "router: a normal head is answered")
half = b"GET /health HTTP/1.1\r\nHost: t\r\nX-"
closed = head_answer(lim, half, 5)
check(closed is not None and not closed.startswith(b"HTTP/1.1 200"),
      f"router: a half-sent head is cut off after header_read_timeout_seconds ({closed!r})")
stop(lim_proc)
cap_proc, cap = router("round_robin", "max_connections: 2\n")
held = [socket.create_connection(("127.0.0.1", cap)) for _ in range(2)]
for h in held:
    h.sendall(half)
time.sleep(0.3)
third = socket.create_connection(("127.0.0.1", cap))
third.sendall(ok)
third.settimeout(0.7)
try:
    early = third.recv(64)
except (socket.timeout, TimeoutError):
    early = None
for h in held:
    h.close()
third.settimeout(10)
late = third.recv(64)
third.close()
check(early is None and late.startswith(b"HTTP/1.1 200"),
      f"router: past max_connections = 2 a third connection waits, then is served ({early!r}, {late[:12]!r})")
stop(cap_proc)

ch_proc, ch = router("consistent_hash")
homes = {}
for user in range(12):
    got = {raw(ch, "/v1/completions", {"model": "smol", "prompt": "hi", "max_tokens": 1, "user": f"u{user}"})[1][INSTANCE]
           for _ in range(3)}
    check(len(got) == 1, f"consistent_hash: user u{user} stays on one instance ({got})")
    homes[user] = got.pop()
check(len(set(homes.values())) >= 2, f"consistent_hash: users spread over instances ({set(homes.values())})")
got = {raw(ch, "/v1/completions", {"model": "smol", "prompt": "hi", "max_tokens": 1},
           {"x-session-id": "session-7"})[1][INSTANCE] for _ in range(3)}
check(len(got) == 1, "consistent_hash: the affinity header keys the session too")
stop(ch_proc)

# cache_aware against round_robin: 4 long shared documents, 4 questions each, sent one at a time through each policy
# over 3 fresh instances; the instances' own prefix-cache counters give the hit rates (TTFT is printed, not judged:
# timing belongs in benchmarks).
WORDS = "the of and to in is was that for on with as by at from his her they this which time people year way".split()
docs = [f"Document {d}: " + " ".join(WORDS[(d * 7 + i * 3) % len(WORDS)] for i in range(300)) for d in range(4)]
questions = ["Summarize it.", "Give it a title.", "What is the first word?", "Name three words from it."]
rates = {}
for policy in ["round_robin", "cache_aware"]:
    fresh = [start(binary, SERVE) for _ in range(3)]
    port = free_port()
    cmd = [binary, "router", "--port", str(port), "--policy", policy, "--log-level", "warn"]
    for _, p in fresh:
        cmd += ["--backend", f"http://127.0.0.1:{p}"]
    rp = start_command(cmd, port)
    t0 = time.time()
    for q in questions:
        for d in docs:
            st, _, _ = raw(port, "/v1/chat/completions", {"model": "smol", "max_tokens": 1, "messages": [
                {"role": "user", "content": f"{d}\n\n{q}"}]})
            assert st == 200
    took = time.time() - t0
    hits = queries = 0
    for _, p in fresh:
        m = metrics(p)
        hits += sum(v for k, v in m.items() if k.startswith("mlx_serving:prefix_cache_hits"))
        queries += sum(v for k, v in m.items() if k.startswith("mlx_serving:prefix_cache_queries"))
    rates[policy] = hits / queries
    print(f"{policy}: prefix-cache hit rate {rates[policy]:.3f}, 16 requests in {took:.2f} s", flush=True)
    stop(rp)
    for proc, _ in fresh:
        stop(proc)
check(rates["cache_aware"] > rates["round_robin"] + 0.1,
      f"cache_aware keeps shared prefixes on one instance: hit rate {rates['cache_aware']:.3f} against "
      f"round_robin's {rates['round_robin']:.3f}")

# Experiments: canaries judged on their first-byte times, and a feature flag.
qwen_proc, qport = start(binary, ["--model", slower, "--served-model-name", "qwen", "--threads", "1",
                                  "--kv-cache-mb", "64", "--log-level", "warn"])
exp_cfg = f"""experiments:
  - name: bad-canary
    model: chat-bad
    kind: canary
    arms:
      - {{name: stable, backends: ["{urls[0]}"], model: smol}}
      - {{name: canary, backends: ["http://127.0.0.1:{qport}"], model: qwen}}
    stages: [50, 100]
    window_seconds: 2
    min_samples: 8
  - name: good-canary
    model: chat-good
    kind: canary
    arms:
      - {{name: stable, backends: ["{urls[0]}"], model: smol}}
      - {{name: canary, backends: ["{urls[0]}"], model: smol}}
    stages: [50, 100]
    window_seconds: 2
    min_samples: 12
    max_p_value: 0.01
    min_effect_size: 1.0
flags:
  - {{name: short, percent: 50, set: {{max_tokens: 1}}}}
"""
ex_proc, ex = router("least_outstanding", exp_cfg)


def experiment(name):
    return http(ex, "GET", f"/admin/experiments/{name}")[2]


def drive(model_name, until, seconds):
    """Streams the same short chat from fresh users until `until()` or `seconds` pass; returns the arms seen.
    (One prompt for all: the time to the first token with text depends on the prompt.)"""
    arms, t, k = [], time.time(), 0
    while time.time() - t < seconds and not until():
        c = HTTPConnection("127.0.0.1", ex, timeout=120)
        c.request("POST", "/v1/chat/completions", json.dumps({
            "model": model_name, "stream": True, "max_tokens": 4, "temperature": 0, "user": f"user-{k}",
            "messages": [{"role": "user", "content": PROMPTS[0]}]}), {"Content-Type": "application/json"})
        r = c.getresponse()
        arms.append(r.getheader("x-mlx-serving-arm"))
        r.read()
        c.close()
        k += 1
    return arms


drive("chat-bad", lambda: experiment("bad-canary")["status"] != "running", 60)
bad_canary = experiment("bad-canary")
why = bad_canary["history"][-1].get("why", {})
check(bad_canary["status"] == "rolled_back" and why.get("measure") in ("ttft", "itl") and why["p_value"] < 0.05,
      f"a slower canary is rolled back on its {why.get('measure')} (p = {why.get('p_value')}, d = "
      f"{why.get('effect_size')}, {why.get('stable_mean')} s vs {why.get('canary_mean')} s)")
m = metrics(ex)
check(m.get('router_arm_ttft_seconds_count{experiment="bad-canary",arm="canary"}', 0) >= 8
      and m.get('router_arm_ttft_seconds{experiment="bad-canary",arm="canary",quantile="0.5"}', 0) > 0
      and m.get('router_experiment_canary_share{experiment="bad-canary"}') == 0,
      "/metrics: per-arm TTFT quantiles and the canary's share")
after = drive("chat-bad", lambda: False, 1.5)
check(after and all(a == "bad-canary/stable" for a in after), f"after the rollback all traffic is stable ({len(after)})")
# The equal canary's arms share one instance, so they are equal by construction (two instances of one machine
# drift apart by more than this test's thresholds now and then, and a fleet would rightly hold that against one).
drive("chat-good", lambda: experiment("good-canary")["status"] != "running", 60)
good = experiment("good-canary")
check(good["status"] == "promoted" and [h["event"] for h in good["history"]] == ["started", "promoted"],
      f"an equal canary advances to 100 % ({good['history']}, TTFT p = "
      f"{(good['comparison']['ttft'] or {}).get('p')})")
after = drive("chat-good", lambda: False, 1.0)
check(after and all(a == "good-canary/canary" for a in after), "promoted: all traffic on the canary")
_, _, listed = http(ex, "GET", "/admin/experiments")
check([e["name"] for e in listed["experiments"]] == ["bad-canary", "good-canary"], "/admin/experiments lists both")
st, _, _ = http(ex, "GET", "/admin/experiments/nope")
check(st == 404, "an unknown experiment: 404")
flagged = {}
for user in range(24):
    for _ in range(2):
        st, headers, body = raw(ex, "/v1/completions", {"model": "smol", "prompt": "Once upon a time", "max_tokens": 6,
                                                         "temperature": 0, "ignore_eos": True, "user": f"f{user}"})
        on = "short" in headers.get("x-mlx-serving-flags", "")
        check(body["usage"]["completion_tokens"] == (1 if on else 6) and flagged.get(user, on) == on,
              f"flag `short` {'on' if on else 'off'} for user f{user}: max_tokens {body['usage']['completion_tokens']}")
        flagged[user] = on
check(4 <= sum(flagged.values()) <= 20, f"the 50 % flag is on for some users and off for others ({sum(flagged.values())})")
stop(ex_proc)
stop(qwen_proc)

# SLOs: SmolLM2 and Qwen2.5-0.5B behind one model name, a TTFT target between their speeds. The slow instance is
# degraded to a tenth of the traffic, low-priority requests are shed, the webhook hears of it.
hooks = []


class Hook(BaseHTTPRequestHandler):
    def do_POST(self):
        hooks.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *a):
        pass


hook_server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
threading.Thread(target=hook_server.serve_forever, daemon=True).start()
# (Prefix caching off there, so each of its answers computes the whole prompt: clearly slower.)
slow_proc, sport = start(binary, ["--model", slower, "--served-model-name", "smol", "--threads", "1",
                                  "--kv-cache-mb", "64", "--log-level", "warn", "--no-prefix-caching"])
slow_url = f"http://127.0.0.1:{sport}"
slo_port = free_port()
slo_dir = tempfile.mkdtemp()
with open(os.path.join(slo_dir, "router.yaml"), "w") as f:
    f.write(f"""health_interval_seconds: 0.2
policy: round_robin
backends: [{{url: "{urls[0]}"}}, {{url: "{slow_url}"}}]
slo:
  - model: smol
    window_seconds: 4
    ttft_p95_ms: 40
    min_samples: 10
    webhook_url: http://127.0.0.1:{hook_server.server_port}/alerts
""")
slo_proc = start_command([binary, "router", "--config", os.path.join(slo_dir, "router.yaml"), "--port", str(slo_port),
                          "--log-level", "warn"], slo_port)


def stream_chat(port, n, **extra):
    """n streamed chats of one prompt; the instances that answered."""
    seen = []
    for _ in range(n):
        st, headers, _ = raw_stream(port, {"model": "smol", "stream": True, "max_tokens": 4, "temperature": 0,
                                           "messages": [{"role": "user", "content": PROMPTS[0]}], **extra})
        seen.append(headers.get(INSTANCE))
    return seen


def raw_stream(port, body):
    c = HTTPConnection("127.0.0.1", port, timeout=120)
    c.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, data


before = stream_chat(slo_port, 24)
check(before.count(slow_url) >= 10, f"round_robin sends the slow instance its turns until degraded ({before.count(slow_url)} of 24)")
report = {}
for _ in range(30):
    report = http(slo_port, "GET", "/admin/slo")[2]["slo"][0]
    if report["degraded_instances"]:
        break
    time.sleep(0.1)
check(not report["ok"] and report["missed"] == ["ttft_p95"] and report["degraded_instances"] == [slow_url],
      f"the SLO is missed and the slow instance degraded ({report['measured']})")
after = stream_chat(slo_port, 20)
check(after.count(slow_url) <= 4, f"a degraded instance gets about a tenth of the traffic ({after.count(slow_url)} of 20)")
st, headers, body = raw_stream(slo_port, {"model": "smol", "max_tokens": 2, "priority": "low",
                                          "messages": [{"role": "user", "content": "hi"}]})
check(st == 429 and headers.get("retry-after") == "1" and b"slo_shed" in body, "low-priority requests are shed (429)")
st, _, _ = raw_stream(slo_port, {"model": "smol", "max_tokens": 2, "priority": "high",
                                 "messages": [{"role": "user", "content": "hi"}]})
check(st == 200, "other priorities are served")
m = metrics(slo_port)
check(m.get('router_slo_ok{model="smol"}') == 0 and m.get(f'router_instance_degraded{{instance="{slow_url}"}}') == 1
      and m.get('router_slo_shed_total{model="smol"}') == 1, "/metrics shows the SLO, the degraded instance, the shed")
check(any(h["state"] == "violated" and h["model"] == "smol" and h["missed"] == ["ttft_p95"] for h in hooks),
      f"the webhook heard of the violation ({len(hooks)} calls)")
stop(slo_proc)
stop(slow_proc)
hook_server.shutdown()

# Failover under load: kill -9 one instance while requests flow; no non-streamed request fails.
results, errors = [], []


def worker(k):
    c = OpenAI(base_url=f"http://127.0.0.1:{lo}/v1", api_key="none", max_retries=0)
    for j in range(8):
        p = PROMPTS[(k + j) % len(PROMPTS)]
        try:
            r = c.chat.completions.create(model="smol", max_tokens=24, temperature=0,
                                          messages=[{"role": "user", "content": p}])
            results.append((p, r.choices[0].message.content))
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))


want = {p: direct.chat.completions.create(model="smol", max_tokens=24, temperature=0,
                                          messages=[{"role": "user", "content": p}]).choices[0].message.content
        for p in PROMPTS}
threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
for t in threads:
    t.start()
time.sleep(1.5)
victim, vport = instances[2]
os.kill(victim.pid, signal.SIGKILL)
victim.wait()
for t in threads:
    t.join()
check(not errors and len(results) == 48, f"kill -9 under load: all 48 requests answered ({len(errors)} errors: "
      f"{errors[:2]})")
check(all(want[p] == text for p, text in results), "every answer under failover is the greedy answer")
m = metrics(lo)
check(m.get(f'router_instance_retries_total{{instance="{urls[2]}"}}', 0) >= 1 and m.get("router_retries_total", 0) >= 1,
      "/metrics counts the retries away from the killed instance")


def instance_state(port, url):
    return next(i for i in http(port, "GET", "/admin/instances")[2]["instances"] if i["url"] == url)


for _ in range(50):
    if not instance_state(lo, urls[2])["healthy"]:
        break
    time.sleep(0.1)
check(not instance_state(lo, urls[2])["healthy"], "the killed instance leaves the healthy set")
# Restarted on its port, it rejoins and gets traffic again.
instances[2] = (start_command([binary, "serve", "--port", str(vport)] + SERVE, vport), vport)
for _ in range(50):
    if instance_state(lo, urls[2])["healthy"]:
        break
    time.sleep(0.1)
check(instance_state(lo, urls[2])["healthy"], "a restarted instance rejoins")
before = instance_state(lo, urls[2])["requests"]
for _ in range(6):
    raw(lo, "/v1/completions", {"model": "smol", "prompt": "hi", "max_tokens": 1})
rr_proc, rr = router("round_robin")
for _ in range(3):
    raw(rr, "/v1/completions", {"model": "smol", "prompt": "hi", "max_tokens": 1})
check(instance_state(rr, urls[2])["requests"] >= 1, "the rejoined instance gets traffic")
stop(rr_proc)
del before

# An instance dying mid-stream: that stream ends with an error event; the others go on.
c = HTTPConnection("127.0.0.1", lo, timeout=120)
c.request("POST", "/v1/chat/completions", json.dumps({
    "model": "smol", "stream": True, "max_tokens": 2000, "temperature": 1.0, "seed": 1, "ignore_eos": True,
    "messages": [{"role": "user", "content": "Tell me a very long story."}]}), {"Content-Type": "application/json"})
r = c.getresponse()
serving = r.getheader(INSTANCE)
r.readline()
k = urls.index(serving)
os.kill(instances[k][0].pid, signal.SIGKILL)
instances[k][0].wait()
rest = r.read().decode()
check('"code":"instance_failed"' in rest.replace(" ", ""), "a stream whose instance dies ends with an error event")
c.close()
st, _, body = raw(lo, "/v1/completions", {"model": "smol", "prompt": "hi", "max_tokens": 2})
check(st == 200, "other requests go on")

# No instance alive: 503 with Retry-After.
for p, _ in instances:
    if p.poll() is None:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
time.sleep(0.5)
st, headers, body = raw(lo, "/v1/completions", {"model": "smol", "prompt": "hi", "max_tokens": 2})
check(st == 503 and headers.get("retry-after") == "1" and body["error"]["code"] == "no_instance",
      f"no instance alive: 503 with Retry-After ({st} {body})")
st, _, _ = http(lo, "GET", "/health")
check(st == 503, "the router's /health says no instance is available")
stop(lo_proc)

# The Redis registry: instances that `serve --register` join a router that has no static backends; a killed one
# leaves within its entry's expiry, a restarted one rejoins, a cleanly stopped one leaves at once.
rport = free_port()
redis_server(rport)
redis = f"redis://127.0.0.1:{rport}"
port = free_port()
reg_router = start_command([binary, "router", "--port", str(port), "--redis-url", redis, "--log-level", "warn"],
                           port, health="/metrics")


def registered():
    return {i["url"]: i for i in http(port, "GET", "/admin/instances")[2]["instances"]}


members = [start(binary, SERVE + ["--register", redis]) for _ in range(2)]
murls = [f"http://127.0.0.1:{p}" for _, p in members]
check(wait_for(lambda: set(murls) <= set(registered()), 5) is not None, "registered instances join the router")
check(all(registered()[u]["source"] == "registered" and registered()[u]["models"] == ["smol"] for u in murls),
      "their entries carry their models")
rc = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
got = rc.chat.completions.create(model="smol", max_tokens=24, temperature=0,
                                 messages=[{"role": "user", "content": PROMPTS[0]}]).choices[0].message.content
check(got == want[PROMPTS[0]], "greedy answer through registered instances")
os.kill(members[0][0].pid, signal.SIGKILL)
members[0][0].wait()
took = wait_for(lambda: murls[0] not in registered(), 8)
check(took is not None, f"a killed instance leaves the registry within its expiry ({took and round(took, 1)} s)")
mport = members[0][1]
members[0] = (start_command([binary, "serve", "--port", str(mport)] + SERVE + ["--register", redis], mport), mport)
check(wait_for(lambda: murls[0] in registered(), 5) is not None, "a restarted instance registers again")
stop(members[1][0])
took = wait_for(lambda: murls[1] not in registered(), 2)
check(took is not None, f"a cleanly stopped instance leaves at once ({took and round(took, 1)} s)")
stop(reg_router)
print("router: all checks passed")

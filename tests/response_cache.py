#!/usr/bin/env python3
"""The response cache (#22) through a real `mlx-serving serve` and the official `openai` client.

Usage: response_cache.py BINARY SMOLLM2_GGUF

Memory backend: a greedy or seeded request misses, then hits with the same choices (ids and text) and a fresh
id, as JSON and as SSE (same text, same usage); unseeded sampling never hits; a changed field misses;
`Cache-Control: no-cache` and `cache: false` bypass it; /metrics counts hits and misses. Disk backend: entries
survive a restart, and after a kill -9 in the middle of writes every entry served is whole. Redis backend (a
real `redis-server` on a free loopback port): two instances share answers; with Redis killed no request fails,
the outage is counted, and after a restart the hits resume.
"""
import os, shutil, signal, sys, tempfile, threading, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import check, metrics, start, stop  # noqa: E402
import harness  # noqa: E402
from openai import OpenAI  # noqa: E402

binary, model = sys.argv[1:3]
COMMON = ["--model", model, "--served-model-name", "smol", "--threads", "2", "--kv-cache-mb", "64"]


def ask(client, prompt, headers=None, **kw):
    """(x-cache, content, token ids, id, usage) of a whole chat answer."""
    kw = {"max_tokens": 24, "temperature": 0, **kw}
    extra = {"return_token_ids": True, **kw.pop("extra_body", {})}
    raw = client.chat.completions.with_raw_response.create(
        model="smol", messages=[{"role": "user", "content": prompt}], extra_body=extra, extra_headers=headers, **kw)
    r = raw.parse()
    c = r.choices[0]
    return raw.headers.get("x-cache"), c.message.content, c.model_extra["token_ids"], r.id, r.usage.completion_tokens


def ask_stream(client, prompt, **kw):
    raw = client.chat.completions.with_raw_response.create(
        model="smol", messages=[{"role": "user", "content": prompt}], stream=True,
        stream_options={"include_usage": True}, **{"max_tokens": 24, "temperature": 0, **kw})
    text, usage, ids = "", None, set()
    for c in raw.parse():
        ids.add(c.id)
        if c.choices and c.choices[0].delta.content:
            text += c.choices[0].delta.content
        usage = c.usage or usage
    return raw.headers.get("x-cache"), text, usage.completion_tokens, ids


proc, port = start(binary, COMMON + ["--response-cache", "memory"])
client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
first = ask(client, "Name three colors.")
again = ask(client, "Name three colors.")
check(first[0] == "miss" and again[0] == "hit", f"a greedy request misses, then hits ({first[0]}, {again[0]})")
check(again[1:3] == first[1:3] and again[4] == first[4], "the hit has the same text, token ids and usage")
check(again[3] != first[3], "and a fresh id")
s = ask_stream(client, "Name three colors.")
check(s[0] == "hit" and s[1] == first[1] and s[2] == first[4] and len(s[3]) == 1,
      "the same request streamed is a hit replayed as SSE (same text and usage, one id)")
fresh = ask_stream(client, "Name four animals.")
whole = ask(client, "Name four animals.")
check(fresh[0] == "miss" and whole[0] == "hit" and whole[1] == fresh[1], "a streamed answer is stored whole too")
seeded = dict(temperature=0.9, seed=5)
a, b = ask(client, "Tell me a fact.", **seeded), ask(client, "Tell me a fact.", **seeded)
check((a[0], b[0]) == ("miss", "hit") and a[1:3] == b[1:3], "seeded sampling is cached")
u = [ask(client, "Tell me a fact.", temperature=0.9) for _ in range(2)]
check([x[0] for x in u] == ["miss", "miss"], "unseeded sampling never hits")
check(ask(client, "Name three colors.", max_tokens=25)[0] == "miss", "another max_tokens misses")
check(ask(client, "Name three colors.", seed=1)[0] == "miss", "a seed on a greedy request is another key")
check(ask(client, "Name three colors.", headers={"Cache-Control": "no-cache"})[0] == "miss", "Cache-Control: no-cache bypasses a present entry")
check(ask(client, "Say hi.", extra_body={"cache": False})[0] == "miss" and ask(client, "Say hi.")[0] == "miss",
      "cache: false neither reads nor stores")
m = metrics(port)
check(m["mlx_serving:response_cache_hits_total"] == 4 and m["mlx_serving:response_cache_entries"] >= 4,
      f"/metrics counts hits ({m['mlx_serving:response_cache_hits_total']:.0f}) and entries")
stop(proc)

# Disk: entries survive a restart; a kill -9 mid-write never leaves an entry that is served damaged.
d = tempfile.mkdtemp(prefix="mlx-serving-cache-")
proc, port = start(binary, COMMON + ["--response-cache", "disk", "--cache-path", d])
client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
first = ask(client, "Name three colors.")
stop(proc)
proc, port = start(binary, COMMON + ["--response-cache", "disk", "--cache-path", d])
client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
again = ask(client, "Name three colors.")
check(first[0] == "miss" and again[0] == "hit" and again[1:3] == first[1:3], "a disk entry survives a restart")
prompts = [f"Count from {i} to {i + 5}." for i in range(100)]
def fire():
    for p in prompts:
        try:
            ask(client, p, max_tokens=8)
        except Exception:
            return
t = threading.Thread(target=fire)
t.start()
time.sleep(1.5)
proc.send_signal(signal.SIGKILL)
proc.wait()
t.join()
proc, port = start(binary, COMMON + ["--response-cache", "disk", "--cache-path", d])
client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
hits = bad = 0
for p in prompts:
    got = ask(client, p, max_tokens=8)
    live = ask(client, p, max_tokens=8, extra_body={"cache": False})
    hits += got[0] == "hit"
    bad += got[1:3] != live[1:3]
check(bad == 0, f"after kill -9: every one of {len(prompts)} answers whole and right ({hits} from the cache)")
check(0 < hits < len(prompts), f"the kill came part way: {hits} entries written before it were served, the rest recomputed")
stop(proc)
shutil.rmtree(d)
# Redis: two instances share one real redis-server; killed mid-run, no request fails and the hits resume.
rport = harness.free_port()
redis = harness.redis_server(rport)
url = f"redis://127.0.0.1:{rport}"
a_proc, a_port = start(binary, COMMON + ["--response-cache", "redis", "--redis-url", url])
b_proc, b_port = start(binary, COMMON + ["--response-cache", "redis", "--redis-url", url])
a = OpenAI(base_url=f"http://127.0.0.1:{a_port}/v1", api_key="x")
b = OpenAI(base_url=f"http://127.0.0.1:{b_port}/v1", api_key="x")
first = ask(a, "Name three colors.")
other = ask(b, "Name three colors.")
check(first[0] == "miss" and other[0] == "hit" and other[1:3] == first[1:3],
      "an answer computed by one instance is a hit on the other")
redis.kill()
redis.wait()
down = [ask(a, f"Spell the word {w}.", max_tokens=6) for w in ("cat", "dog", "cat")]
check(all(d[0] == "miss" for d in down) and down[0][1:3] == down[2][1:3],
      "with Redis down every request is answered (from the engine), none fails")
m = metrics(a_port)
check(m["mlx_serving:response_cache_errors_total"] > 0, "the outage shows in /metrics")
redis = harness.redis_server(rport)
time.sleep(1.2)  # past the retry interval
ask(a, "Name five fruits.")
back = ask(b, "Name five fruits.")
check(back[0] == "hit", "Redis restarted: the instances share answers again")
stop(a_proc)
stop(b_proc)
redis.kill()

print(f"all {harness.checks} checks passed")

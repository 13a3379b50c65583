#!/usr/bin/env python3
"""Multi-model serving benchmarks (issue #19), every figure measured in this one run.

Usage: scripts/bench-multi-model.py BINARY LLAMA_SERVER SMOLLM2_GGUF QWEN_GGUF [--reps 5] [--rounds 3]

1. Cold start to first token: our server with both models registered but not loaded, a streaming request of
   one token to a model (its load included), against llama-server started on the same file (process start to
   first token), with the file's pages dropped from the page cache first (cold, posix_fadvise DONTNEED) or
   read once before (warm). Our normal TTFT (model loaded) is measured right after each cold start, and the
   load overhead is the difference.
2. Mixed workload at 8 streams: one server with both models and 2 threads, against two single-model servers
   each pinned to one core (`taskset`) with 1 thread; in both cases one client per model at 4 streams, both at
   once, with 4x as many SmolLM2 requests as Qwen2.5 ones so both stay busy about equally long. Ratio of the
   sums of per-model output tok/s, and of all tokens over the makespan.
3. Fairness: one Qwen2.5 stream alone, and beside 8 busy SmolLM2 streams, on the two-model server.
"""
import argparse, json, os, socket, statistics, subprocess, tempfile, threading, time, urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("binary")
ap.add_argument("llama_server")
ap.add_argument("smol")
ap.add_argument("qwen")
ap.add_argument("--reps", type=int, default=5)
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--num-prompts", type=int, default=16)
ap.add_argument("--max-tokens", type=int, default=64)
ap.add_argument("--sections", default="cold,mixed,fair", help="comma-separated: cold, mixed, fair")
a = ap.parse_args()
MODELS = {"smol": a.smol, "qwen": a.qwen}
PROMPT = "Write a short story about a robot who learns to paint."


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            return r.status == 200
    except Exception:
        return False


def wait_healthy(proc, port, poll=0.005):
    while not healthy(port):
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        time.sleep(poll)


def first_token(port, model):
    """Seconds from sending a streaming completion to its first text chunk."""
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": 1, "temperature": 0, "stream": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
            if line.startswith(b"data:") and b'"text"' in line:
                t = time.perf_counter() - t0
                r.read()
                return t
    raise SystemExit("no token")


def drop_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm_cache(path):
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def post(port, path):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=300) as r:
        r.read()


def med(xs):
    return statistics.median(xs)


def serve_both():
    """Our server with both models registered (not loaded), 2 threads; returns (process, port) once healthy."""
    port = free_port()
    proc = subprocess.Popen([a.binary, "serve", "--port", str(port), "--threads", "2", "--log-level", "warn"]
                            + [x for n, p in MODELS.items() for x in ("--model", f"{n}={p}")])
    wait_healthy(proc, port)
    return proc, port


SECTIONS = a.sections.split(",")
tmp = tempfile.mkdtemp()


def bench(port, model, concurrency, out, num_prompts=None):
    return subprocess.Popen([a.binary, "bench", "--url", f"http://127.0.0.1:{port}", "--model", model, "--completions",
                             "--concurrency", str(concurrency), "--num-prompts", str(num_prompts or a.num_prompts),
                             "--max-tokens", str(a.max_tokens), "--ignore-eos", "--rounds", "1", "--output", out],
                            stdout=subprocess.DEVNULL)


def throughput(out):
    with open(out) as f:
        e = json.load(f)["levels"][0]["endpoints"][0]
    if e["failed"]:
        raise SystemExit(f"{out}: {e['failed']} requests failed")
    return e["output_throughput"]


if "cold" in SECTIONS:
    print("## Cold start to first token", flush=True)
    ours, port = serve_both()
    rows = []
    for name, path in MODELS.items():
        for cache in ["warm", "cold"]:
            load_ttft, normal, llama = [], [], []
            for _ in range(a.reps):
                post(port, f"/v1/models/{name}/unload")
                (drop_cache if cache == "cold" else warm_cache)(path)
                load_ttft.append(first_token(port, name))
                normal.append(first_token(port, name))
                (drop_cache if cache == "cold" else warm_cache)(path)
                lport = free_port()
                t0 = time.perf_counter()
                peer = subprocess.Popen([a.llama_server, "-m", path, "--host", "127.0.0.1", "--port", str(lport), "-t", "2",
                                         "-c", "4096", "--no-webui"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                wait_healthy(peer, lport)
                first_token(lport, name)
                llama.append(time.perf_counter() - t0)
                peer.kill()
                peer.wait()
            row = (name, cache, med(load_ttft), med(normal), med(load_ttft) - med(normal), med(llama))
            rows.append(row)
            print(f"{name} {cache}: ours TTFT with load {row[2]:.3f} s, loaded {row[3]:.3f} s, load overhead {row[4]:.3f} s; "
                  f"llama-server start to first token {row[5]:.3f} s (medians of {a.reps})", flush=True)
    ours.terminate()
    ours.wait()

if "mixed" in SECTIONS:
    print("\n## Mixed workload, 8 streams over two models", flush=True)
    # Each model gets its own client at 4 streams, with request counts that keep both busy for about the same
    # time (SmolLM2 decodes about 4x faster than Qwen2.5-0.5B), so that every server is loaded for the whole run.
    COUNTS = {"smol": 4 * a.num_prompts, "qwen": a.num_prompts}


    def pair(ports, tag):
        """Both clients at once (4 streams each); returns {model: tok/s} and the aggregate over the makespan."""
        t0 = time.perf_counter()
        runs = [bench(ports[n], n, 4, os.path.join(tmp, f"{tag}-{n}.json"), COUNTS[n]) for n in MODELS]
        for r in runs:
            r.wait()
        makespan = time.perf_counter() - t0
        levels = {}
        for n in MODELS:
            throughput(os.path.join(tmp, f"{tag}-{n}.json"))
            with open(os.path.join(tmp, f"{tag}-{n}.json")) as f:
                levels[n] = json.load(f)["levels"][0]["endpoints"][0]
        tokens = sum(v["total_output_tokens"] for v in levels.values())
        return {n: v["output_throughput"] for n, v in levels.items()}, tokens / makespan


    ratios, wall_ratios = [], []
    for rnd in range(a.rounds):
        # Two single-model servers, one core and one thread each.
        singles, ports = [], {}
        for core, (name, path) in enumerate(MODELS.items()):
            ports[name] = free_port()
            singles.append(subprocess.Popen(["taskset", "-c", str(core), a.binary, "serve", "--port", str(ports[name]),
                                             "--model", path, "--served-model-name", name, "--threads", "1",
                                             "--log-level", "warn"]))
        for p, name in zip(singles, MODELS):
            wait_healthy(p, ports[name])
        single, single_wall = pair(ports, "single")
        for p in singles:
            p.terminate()
            p.wait()
        # One server with both models and both cores.
        both, port = serve_both()
        mixed, mixed_wall = pair({n: port for n in MODELS}, "both")
        both.terminate()
        both.wait()
        ratio = sum(mixed.values()) / sum(single.values())
        ratios.append(ratio)
        wall_ratios.append(mixed_wall / single_wall)
        print(f"round {rnd}: ours smol {mixed['smol']:.1f} + qwen {mixed['qwen']:.1f} = {sum(mixed.values()):.1f} tok/s; "
              f"singles {single['smol']:.1f} + {single['qwen']:.1f} = {sum(single.values()):.1f} tok/s; ratio {ratio:.2f}; "
              f"over the makespan {mixed_wall:.1f} vs {single_wall:.1f} tok/s ({mixed_wall / single_wall:.2f})", flush=True)
    print(f"median ratio {med(ratios):.2f} (sum of per-model tok/s), {med(wall_ratios):.2f} (over the makespan), {a.rounds} rounds")

if "fair" in SECTIONS:
    print("\n## Fairness: one qwen stream beside 8 busy smol streams", flush=True)
    both, port = serve_both()


    def level(out):
        with open(out) as f:
            return json.load(f)["levels"][0]["endpoints"][0]


    for rnd in range(a.rounds):
        alone = os.path.join(tmp, "qwen-alone.json")
        bench(port, "qwen", 1, alone, 6).wait()
        busy = subprocess.Popen([a.binary, "bench", "--url", f"http://127.0.0.1:{port}", "--model", "smol", "--completions",
                                 "--concurrency", "8", "--num-prompts", "100000", "--max-tokens", str(a.max_tokens),
                                 "--ignore-eos", "--rounds", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(3)
        beside = os.path.join(tmp, "qwen-beside.json")
        bench(port, "qwen", 1, beside, 6).wait()
        busy.kill()
        busy.wait()
        x, y = level(alone), level(beside)
        print(f"round {rnd}: qwen alone {x['output_throughput']:.1f} tok/s (TTFT p50 {x['ttft_ms']['p50']:.0f} ms, "
              f"TPOT p50 {x['tpot_ms']['p50']:.1f} ms); beside 8 smol streams {y['output_throughput']:.1f} tok/s "
              f"(TTFT p50 {y['ttft_ms']['p50']:.0f} ms, TPOT p50 {y['tpot_ms']['p50']:.1f} ms): "
              f"{y['output_throughput'] / x['output_throughput']:.2f} of alone", flush=True)
    both.terminate()
    both.wait()

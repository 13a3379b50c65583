#!/usr/bin/env python3
"""The fleet router's costs and gains (#23), measured with `mlx-serving bench` on loopback:

1. overhead: TTFT through the router against the same instance directly (one instance, concurrency 1,
   interleaved rounds A, B, A, B...); the router's added TTFT p50/p99 is the difference;
2. throughput: three instances loaded at once, directly (three bench clients at concurrency C each, their
   output tok/s summed) against through the router (one client at 3C, least_outstanding);
3. cache-aware routing: the shared-prefix workload (8 documents of --prefix-len tokens, a question each)
   through round_robin and cache_aware routers over three fresh instances each time (cold caches); TTFT and
   the instances' prefix-cache hit rate (prefix_cache_hits / prefix_cache_queries from their /metrics).

Usage: scripts/bench-router.py [--binary target/release/mlx-serving] [--model models/SmolLM2-135M-Instruct.Q4_1.gguf]
         [--rounds 3] [--prefix-len 400] [--out /tmp/bench-router]
"""
import argparse, json, os, subprocess, sys, threading

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from harness import free_port, metrics, start, start_command, stop  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--binary", default="target/release/mlx-serving")
ap.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--prefix-len", type=int, default=400)
ap.add_argument("--out", default="/tmp/bench-router")
ap.add_argument("--parts", default="overhead,throughput,cache_aware")
args = ap.parse_args()
os.makedirs(args.out, exist_ok=True)
SERVE = ["--model", args.model, "--served-model-name", "smol", "--threads", "1", "--kv-cache-mb", "128",
         "--log-level", "warn"]


def bench(urls, name, extra):
    out = os.path.join(args.out, f"{name}.json")
    cmd = [args.binary, "bench", "--model", "smol", "--output", out] + extra
    for u in urls:
        cmd += ["--url", u]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.load(open(out))


def router(urls, policy):
    port = free_port()
    cmd = [args.binary, "router", "--port", str(port), "--policy", policy, "--log-level", "warn"]
    for u in urls:
        cmd += ["--backend", u]
    return start_command(cmd, port), f"http://127.0.0.1:{port}"


def level(report, k=0):
    return report["levels"][0]["endpoints"][k]


results = {}
parts = args.parts.split(",")
if "overhead" in parts:
    # 1. Overhead on one instance. Every prompt is cached by a throwaway run first, so that every measured
    # request costs the instance the same little (TTFT ~ one token) and the router's part stands out.
    inst, port = start(args.binary, SERVE)
    direct = f"http://127.0.0.1:{port}"
    rproc, rurl = router([direct], "least_outstanding")
    bench([direct], "overhead-warmup", ["--num-prompts", "128", "--concurrency", "1", "--max-tokens", "16"])
    r = bench([direct, rurl], "overhead", ["--num-prompts", "128", "--concurrency", "1", "--max-tokens", "16",
                                           "--rounds", str(args.rounds), "--warmup", "4"])
    d, t = level(r, 0), level(r, 1)
    results["overhead"] = {
        "direct_ttft_p50_ms": d["ttft_ms"]["p50"], "router_ttft_p50_ms": t["ttft_ms"]["p50"],
        "direct_ttft_p99_ms": d["ttft_ms"]["p99"], "router_ttft_p99_ms": t["ttft_ms"]["p99"],
        "added_p50_ms": t["ttft_ms"]["p50"] - d["ttft_ms"]["p50"], "added_p99_ms": t["ttft_ms"]["p99"] - d["ttft_ms"]["p99"],
        "direct_e2e_p50_ms": d["e2e_ms"]["p50"], "router_e2e_p50_ms": t["e2e_ms"]["p50"],
    }
    print(json.dumps(results["overhead"]), flush=True)
    stop(rproc)
    stop(inst)

if "throughput" in parts:
    # 2. Throughput of three instances, at once, direct and through the router.
    insts = [start(args.binary, SERVE) for _ in range(3)]
    urls = [f"http://127.0.0.1:{p}" for _, p in insts]
    rproc, rurl = router(urls, "least_outstanding")
    C = 4
    load = ["--num-prompts", "48", "--max-tokens", "64", "--ignore-eos", "--warmup", "2"]
    through, summed = [], []
    for rnd in range(args.rounds):
        reports = [None] * 3

        def one(k):
            reports[k] = bench([urls[k]], f"direct-{rnd}-{k}", load + ["--concurrency", str(C)])

        threads = [threading.Thread(target=one, args=(k,)) for k in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        summed.append(sum(level(x)["output_throughput"] for x in reports))
        r = bench([rurl], f"router-{rnd}", ["--num-prompts", "144", "--max-tokens", "64", "--ignore-eos", "--warmup", "6",
                                            "--concurrency", str(3 * C)])
        through.append(level(r)["output_throughput"])
        print(f"round {rnd}: direct sum {summed[-1]:.1f} tok/s, router {through[-1]:.1f} tok/s", flush=True)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    results["throughput"] = {"direct_sum_tok_s": summed, "router_tok_s": through,
                             "ratio_median": med([t / s for t, s in zip(through, summed)])}
    print(json.dumps(results["throughput"]), flush=True)
    stop(rproc)
    for p, _ in insts:
        stop(p)

if "cache_aware" in parts:
    # 3. cache_aware against round_robin on shared prefixes, fresh instances each run.
    results["cache_aware"] = []
    for rnd in range(max(1, args.rounds - 1)):
        for policy in ["round_robin", "cache_aware"]:
            insts = [start(args.binary, SERVE) for _ in range(3)]
            urls = [f"http://127.0.0.1:{p}" for _, p in insts]
            rproc, rurl = router(urls, policy)
            r = bench([rurl], f"{policy}-{rnd}", ["--dataset", "shared-prefix:8", "--input-len", str(args.prefix_len),
                                                 "--num-prompts", "96", "--concurrency", "6", "--max-tokens", "8",
                                                 "--warmup", "0", "--seed", str(rnd)])
            hits = queries = 0
            for _, p in insts:
                m = metrics(p)
                hits += sum(v for k, v in m.items() if k.startswith("mlx_serving:prefix_cache_hits"))
                queries += sum(v for k, v in m.items() if k.startswith("mlx_serving:prefix_cache_queries"))
            e = level(r)
            row = {"policy": policy, "round": rnd, "hit_rate": hits / max(queries, 1), "ttft_p50_ms": e["ttft_ms"]["p50"],
                   "ttft_p99_ms": e["ttft_ms"]["p99"], "e2e_p50_ms": e["e2e_ms"]["p50"],
                   "request_throughput": e["request_throughput"], "failed": e["failed"]}
            results["cache_aware"].append(row)
            print(json.dumps(row), flush=True)
            stop(rproc)
            for p, _ in insts:
                stop(p)
json.dump(results, open(os.path.join(args.out, "summary.json"), "w"), indent=1)
print("wrote", os.path.join(args.out, "summary.json"))

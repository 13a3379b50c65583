#!/usr/bin/env python3
"""Speculative decoding, side by side in one run (#20): our server without speculation, with a draft model, and
with n-gram lookup, against llama.cpp's llama-server without and with its draft model, all on 2 threads, measured
by our `bench` (rounds interleaved across the servers), greedy.

Usage: LLAMA_SERVER=/path/to/llama-server scripts/bench-speculative.py [--sections draft,ngram,batch8] [--rounds 2]

- draft:  Qwen2.5-Coder-1.5B with the 0.5B draft on code prompts (testdata/bench/code.jsonl), one stream.
- ngram:  the 1.5B rewriting given code (testdata/bench/edit.jsonl: the answer copies most of the prompt).
- batch8: 8 concurrent streams of code prompts: ours without speculation, with n-gram and with the draft.
Prints the bench tables, decode tok/s (1000 / median TPOT) and ratios, and the acceptance per position from our
servers' /metrics. Without LLAMA_SERVER the llama.cpp columns are left out.
"""
import argparse, json, os, subprocess, sys, tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from harness import free_port, metrics, start, start_command, stop  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BIN = os.path.join(ROOT, "target/release/mlx-serving")
TARGET = os.path.join(ROOT, "models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")
DRAFT = os.path.join(ROOT, "models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
OURS = ["--model", TARGET, "--served-model-name", "qwen", "--threads", "2", "--kv-cache-mb", "256"]

ap = argparse.ArgumentParser()
ap.add_argument("--sections", default="draft,ngram,batch8")
ap.add_argument("--rounds", type=int, default=2)
ap.add_argument("--k", type=int, default=5, help="our --num-speculative-tokens")
args = ap.parse_args()
llama = os.environ.get("LLAMA_SERVER")


def llama_server(extra):
    port = free_port()
    cmd = [llama, "-m", TARGET, "-t", "2", "-c", "4096", "--port", str(port), "-np", "1", "--no-webui"] + extra
    return start_command(cmd, port, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port


def bench(servers, dataset, conc, n, max_tokens):
    """servers: [(name, port)]; returns {name: endpoint level}."""
    out = tempfile.mktemp(suffix=".json")
    cmd = [BIN, "bench", "--dataset", dataset, "--num-prompts", str(n), "--concurrency", str(conc),
           "--max-tokens", str(max_tokens), "--temperature", "0", "--rounds", str(args.rounds), "--warmup", "1",
           "--model", "qwen", "--output", out, "--markdown"]
    for _, port in servers:
        cmd += ["--url", f"http://127.0.0.1:{port}"]
    subprocess.run(cmd, check=True)
    report = json.load(open(out))
    eps = report["levels"][0]["endpoints"]
    return {name: e for (name, _), e in zip(servers, eps)}


def acceptance(port):
    m = metrics(port)
    key = lambda n: m.get(f'mlx_serving:spec_decode_{n}{{model_name="qwen"}}', 0)
    per = [v for k, v in sorted(m.items()) if "accepted_tokens_per_pos" in k]
    drafts = key("num_drafts")
    return {"drafts": drafts, "draft_tokens": key("num_draft_tokens"), "accepted": key("num_accepted_tokens"),
            "acceptance_rate": key("num_accepted_tokens") / max(key("num_draft_tokens"), 1),
            "accepted_per_position_per_draft": [round(v / max(drafts, 1), 3) for v in per],
            "propose_seconds": key("propose_seconds")}


def report(title, res, base):
    print(f"\n## {title}")
    b = res[base]
    for name, e in res.items():
        decode = 1000 / e["tpot_ms"]["p50"] if e["tpot_ms"]["p50"] else 0
        bdec = 1000 / b["tpot_ms"]["p50"]
        print(f"{name:>24}: output {e['output_throughput']:.2f} tok/s ({e['output_throughput'] / b['output_throughput']:.2f}x), "
              f"decode {decode:.2f} tok/s ({decode / bdec:.2f}x), ttft p50 {e['ttft_ms']['p50']:.0f} ms, failed {e['failed']}")
    sys.stdout.flush()


sections = args.sections.split(",")
if "draft" in sections:
    servers, procs = [], []
    for name, extra in [("ours", []), ("ours+draft", ["--draft-model", DRAFT, "--num-speculative-tokens", str(args.k)])]:
        p, port = start(BIN, OURS + extra)
        servers.append((name, port)); procs.append(p)
    if llama:
        # This llama.cpp speculates only with --spec-type (default none); its draft length default is 3.
        for name, extra in [("llama.cpp", []), ("llama.cpp+draft", ["-md", DRAFT, "--spec-type", "draft-simple"])]:
            p, port = llama_server(extra)
            servers.append((name, port)); procs.append(p)
    res = bench(servers, os.path.join(ROOT, "testdata/bench/code.jsonl"), 1, 8, 128)
    report("draft model, code prompts, 1 stream", res, "ours")
    if llama:
        ours, theirs = res["ours+draft"], res["llama.cpp+draft"]
        print(f"ours+draft vs llama.cpp+draft: decode {theirs['tpot_ms']['p50'] / ours['tpot_ms']['p50']:.2f}x, "
              f"output {ours['output_throughput'] / theirs['output_throughput']:.2f}x")
    print("acceptance (ours+draft):", json.dumps(acceptance(servers[1][1])))
    [stop(p) for p in procs]
if "ngram" in sections:
    servers, procs = [], []
    for name, extra in [("ours", []), ("ours+ngram", ["--speculative-method", "ngram", "--num-speculative-tokens", "8"])]:
        p, port = start(BIN, OURS + extra)
        servers.append((name, port)); procs.append(p)
    if llama:
        p, port = llama_server(["--spec-type", "ngram-simple"])
        servers.append(("llama.cpp+ngram", port)); procs.append(p)
    res = bench(servers, os.path.join(ROOT, "testdata/bench/edit.jsonl"), 1, 8, 256)
    report("n-gram lookup, code rewriting, 1 stream", res, "ours")
    print("acceptance (ours+ngram):", json.dumps(acceptance(servers[1][1])))
    [stop(p) for p in procs]
if "batch8" in sections:
    servers, procs = [], []
    for name, extra in [("ours", []), ("ours+ngram", ["--speculative-method", "ngram"]),
                        ("ours+draft", ["--draft-model", DRAFT, "--num-speculative-tokens", str(args.k)])]:
        p, port = start(BIN, OURS + extra)
        servers.append((name, port)); procs.append(p)
    res = bench(servers, os.path.join(ROOT, "testdata/bench/code.jsonl"), 8, 16, 128)
    report("8 concurrent streams, code prompts", res, "ours")
    for name, port in servers[1:]:
        print(f"acceptance ({name}):", json.dumps(acceptance(port)))
    [stop(p) for p in procs]

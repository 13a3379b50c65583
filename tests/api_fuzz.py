#!/usr/bin/env python3
"""Property-based API fuzzing with schemathesis, driven by the server's own `GET /openapi.json`, against a real
`mlx-serving serve` on SmolLM2.

Usage: api_fuzz.py BINARY MODEL SCHEMATHESIS_PYTHONPATH [--max-time 90] [--max-examples 10] [--seed 1]

Every operation of the document is exercised (coverage, fuzzing and stateful phases) with the checks
not_a_server_error (no 5xx), status_code_conformance (only documented statuses), content_type_conformance and
response_schema_conformance (answers, errors included, match their schemas: the error envelope), each request
bounded by a 60 s timeout (a hang fails). Afterwards the server must still be healthy and serve a completion
(the engine is alive). Prints schemathesis' summary (test-case counts) and exits non-zero on any failure.
"""
import argparse, json, os, re, subprocess, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import check, http, start, stop  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("binary")
ap.add_argument("model")
ap.add_argument("st_path")
ap.add_argument("--max-time", type=int, default=90)
ap.add_argument("--max-examples", type=int, default=10)
ap.add_argument("--seed", type=int, default=1)
a = ap.parse_args()

proc, port = start(a.binary, ["--model", a.model, "--served-model-name", "smol", "--threads", "2",
                              "--kv-cache-mb", "64", "--log-level", "warn"])
env = {**os.environ, "PYTHONPATH": a.st_path}

# Streamed answers against the document's `text/event-stream` schema, with schemathesis' own response check
# (ST108): random generation reaches a successful stream only rarely, so these are sent on purpose.
STREAMS = r"""
import json, sys, schemathesis
from schemathesis.specs.openapi.checks import response_schema_conformance
schema = schemathesis.openapi.from_url(sys.argv[1])
for path, body in json.loads(sys.argv[2]):
    schema[path]["POST"].Case(body=body).call_and_validate(checks=[response_schema_conformance])
    print("valid stream:", path)
"""
streams = [
    ("/v1/completions", {"model": "smol", "prompt": "Hi", "max_tokens": 3, "stream": True, "logprobs": 2,
                         "stream_options": {"include_usage": True, "continuous_usage_stats": True}}),
    ("/v1/completions", {"model": "smol", "prompt": ["Hi", "Yes"], "max_tokens": 2, "stream": True, "echo": True}),
    ("/v1/chat/completions", {"model": "smol", "messages": [{"role": "user", "content": "Hi"}], "n": 2,
                              "max_tokens": 3, "stream": True, "logprobs": True, "top_logprobs": 1,
                              "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", {"model": "smol", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
                              "stream": True, "response_format": {"type": "json_object"}}),
]
r = subprocess.run([sys.executable, "-c", STREAMS, f"http://127.0.0.1:{port}/openapi.json", json.dumps(streams)],
                   env=env, capture_output=True, text=True, timeout=300)
print(r.stdout, r.stderr[-3000:])
check(r.returncode == 0 and r.stdout.count("valid stream:") == len(streams),
      "every streamed answer's events match the document's text/event-stream schema")
cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"http://127.0.0.1:{port}/openapi.json",
       "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
       "-n", str(a.max_examples), "-w", "1", "--request-timeout", "60", "--max-time", str(a.max_time),
       "--seed", str(a.seed), "--no-color"]
r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.max_time + 600)
out = r.stdout + r.stderr
summary = out[out.find("SUMMARY"):] if "SUMMARY" in out else out[-3000:]
print(summary)
m = re.search(r"(\d+) generated, (\d+) passed", out)
check(r.returncode == 0, f"schemathesis found no failure (exit {r.returncode})")
check(m is not None and int(m.group(1)) > 0 and m.group(1) == m.group(2),
      f"every generated request passed ({m.group(0) if m else 'no count'})")
st, _, h = http(port, "GET", "/health", None)
check(st == 200 and h["status"] == "ok", "the server is healthy after the run")
st, _, body = http(port, "POST", "/v1/completions", {"model": "smol", "prompt": "The capital of France is",
                                                     "max_tokens": 4, "temperature": 0})
check(st == 200 and body["choices"][0]["text"], "and its engine still serves a completion")
stop(proc)
print(f"api_fuzz: all {harness.checks} checks passed")

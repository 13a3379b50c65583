#!/usr/bin/env python3
"""Structured output against a real `mlx-serving serve`, through the official `openai` client.

Usage: structured_outputs.py BINARY MODEL_PATH

For every schema of testdata/schemas (73 real-world shapes), a chat request with `response_format`
json_schema, greedy and sampled (seeded): every response that finishes with `stop` must parse and validate
against its schema (the `jsonschema` package, formats checked): 100 %, none skipped. Then regexes, choices
and Lark grammars through vLLM's `structured_outputs` on chat and completions, each output checked by an
independent matcher (Python's `re`), `json_object`, and `chat.completions.parse` with a pydantic model.
Requests run 8 at a time, so constrained requests share batches. Exits non-zero on the first failure.
"""
import concurrent.futures, glob, json, os, re, socket, subprocess, sys, time, urllib.request

import jsonschema
import pydantic
from openai import OpenAI

binary, model_path = sys.argv[1], sys.argv[2]
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [binary, "serve", "--model", model_path, "--served-model-name", "m", "--port", str(port),
            "--threads", "2", "--kv-cache-mb", "256"]
    proc = subprocess.Popen(args)
    for _ in range(1200):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc, port
        except Exception:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}")
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not become healthy")


checks = 0


def check(cond, what):
    global checks
    if not cond:
        raise SystemExit(f"FAILED: {what}")
    checks += 1


server, port = start_server()
try:
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
    pool = concurrent.futures.ThreadPoolExecutor(8)
    name = os.path.basename(model_path)

    # The schema set, greedy and sampled.
    cases = []
    for path in sorted(glob.glob(os.path.join(root, "testdata", "schemas", "*.json"))):
        case = json.load(open(path))
        stem = os.path.basename(path)[:-5]
        cases.append((stem, case))
    check(len(cases) >= 60, f"{len(cases)} schemas")

    def schema_request(stem, case, sampled):
        messages = [
            {"role": "system", "content": "You answer with a single JSON document and nothing else."},
            {"role": "user", "content": case["prompt"]},
        ]
        extra = {"temperature": 0.8, "seed": 7} if sampled else {"temperature": 0}
        r = client.chat.completions.create(
            model="m", messages=messages, max_tokens=320,
            response_format={"type": "json_schema", "json_schema": {"name": re.sub(r"[^a-zA-Z0-9_-]", "_", stem)[:64], "schema": case["schema"], "strict": True}},
            **extra)
        return stem, case, sampled, r.choices[0]

    futures = [pool.submit(schema_request, stem, case, sampled) for stem, case in cases for sampled in (False, True)]
    stopped = length = 0
    for f in futures:
        stem, case, sampled, choice = f.result()
        mode = "sampled" if sampled else "greedy"
        if choice.finish_reason == "length":
            length += 1
            continue
        check(choice.finish_reason == "stop", f"{stem} {mode}: finish_reason {choice.finish_reason}")
        stopped += 1
        try:
            doc = json.loads(choice.message.content)
        except json.JSONDecodeError as e:
            raise SystemExit(f"FAILED: {stem} {mode}: not JSON ({e}): {choice.message.content!r}")
        v = jsonschema.Draft202012Validator(case["schema"], format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
        errors = list(v.iter_errors(doc))
        check(not errors, f"{stem} {mode}: {errors[0].message if errors else ''} in {choice.message.content!r}")
    print(f"{name}: {stopped} of {stopped + length} schema responses stopped, every one valid JSON matching its schema; {length} hit max_tokens")
    check(stopped >= (stopped + length) // 2, f"most schema responses finish ({stopped} of {stopped + length})")

    # Regexes, choices and grammars (vLLM's structured_outputs), on chat and on completions.
    regexes = [
        (r"\d{4}-\d{2}-\d{2}", "When did the first moon landing happen? Give the date."),
        (r"#[0-9a-f]{6}", "Give me a hex color code for a calm blue."),
        (r"[A-Z]{3}-\d{4}", "Invent a flight booking reference."),
        (r"(yes|no), because [a-z ]{1,40}\.", "Is the sky blue? Answer yes or no and why."),
        (r"\+1 \(\d{3}\) \d{3}-\d{4}", "Write a US phone number."),
        (r"[a-z]+@[a-z]+\.(com|org|net)", "Give an email address for a bakery."),
    ]
    choices = [
        (["positive", "negative", "neutral"], "Classify the sentiment: 'I loved this movie!'"),
        (["Paris", "London", "Berlin", "Madrid"], "What is the capital of France?"),
        (["A", "B", "C", "D"], "Which letter comes first in the alphabet? A, B, C or D?"),
    ]
    grammars = [
        ('start: NUM OP NUM " = " NUM\nNUM: /[0-9]{1,3}/\nOP: " + " | " - " | " * "', r"[0-9]{1,3}( \+ | - | \* )[0-9]{1,3} = [0-9]{1,3}", "Write a small arithmetic fact."),
        ('start: pair (", " pair)*\npair: KEY "=" VAL\nKEY: /[a-z]{1,8}/\nVAL: /[0-9]{1,4}/', r"[a-z]{1,8}=[0-9]{1,4}(, [a-z]{1,8}=[0-9]{1,4})*", "List a few settings as key=value pairs."),
        ('start: "SELECT " COLS " FROM " NAME (" WHERE " NAME " = " NUM)?\nCOLS: "*" | NAME\nNAME: /[a-z_]{1,12}/\nNUM: /[0-9]{1,4}/', r"SELECT (\*|[a-z_]{1,12}) FROM [a-z_]{1,12}( WHERE [a-z_]{1,12} = [0-9]{1,4})?", "Write a SQL query that reads all users."),
    ]

    def chat(prompt, so, sampled):
        extra = {"temperature": 0.9, "seed": 3} if sampled else {"temperature": 0}
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}], max_tokens=60,
                                           extra_body={"structured_outputs": so}, **extra)
        return r.choices[0].message.content, r.choices[0].finish_reason

    def completion(prompt, so):
        r = client.completions.create(model="m", prompt=prompt + "\nAnswer: ", max_tokens=60, temperature=0,
                                      extra_body={"structured_outputs": so})
        return r.choices[0].text, r.choices[0].finish_reason

    jobs = []
    for rx, prompt in regexes:
        for sampled in (False, True):
            jobs.append((pool.submit(chat, prompt, {"regex": rx}, sampled), lambda t, rx=rx: re.fullmatch(rx, t), f"regex {rx}"))
        jobs.append((pool.submit(completion, prompt, {"regex": rx}), lambda t, rx=rx: re.fullmatch(rx, t), f"completion regex {rx}"))
    for options, prompt in choices:
        for sampled in (False, True):
            jobs.append((pool.submit(chat, prompt, {"choice": options}, sampled), lambda t, o=options: t in o, f"choice {options}"))
        jobs.append((pool.submit(completion, prompt, {"choice": options}), lambda t, o=options: t in o, f"completion choice {options}"))
    for g, rx, prompt in grammars:
        for sampled in (False, True):
            jobs.append((pool.submit(chat, prompt, {"grammar": g}, sampled), lambda t, rx=rx: re.fullmatch(rx, t), f"grammar {g!r}"))
    stopped = 0
    for fut, ok, what in jobs:
        text, finish = fut.result()
        if finish == "length":
            continue
        stopped += 1
        check(finish == "stop" and ok(text), f"{what}: {text!r} ({finish})")
    print(f"{name}: {stopped} of {len(jobs)} regex/choice/grammar outputs stopped, every one matching")
    check(stopped >= len(jobs) // 2, "most regex/choice/grammar outputs finish")

    # json_object, both spellings.
    for kwargs in ({"response_format": {"type": "json_object"}}, {"extra_body": {"structured_outputs": {"json_object": True}}}):
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Describe a cat as a JSON object."}],
                                           temperature=0, max_tokens=200, **kwargs)
        c = r.choices[0]
        if c.finish_reason == "stop":
            check(isinstance(json.loads(c.message.content), dict), f"json_object gives an object: {c.message.content!r}")

    # The client's own parsing into a pydantic model.
    class City(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=30)
        country: str = pydantic.Field(max_length=30)
        population: int

    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    r = parse(model="m", messages=[{"role": "user", "content": "Describe Paris as JSON with name, country and population."}],
              response_format=City, temperature=0, max_tokens=120)
    msg = r.choices[0].message
    check(r.choices[0].finish_reason == "stop" and isinstance(msg.parsed, City), f"parse gives a City: {msg.content!r}")
    print(f"{name}: parse -> {msg.parsed!r}")

    # Streaming a constrained answer gives the same text as the whole response.
    so = {"json": cases[0][1]["schema"]}
    whole = chat(cases[0][1]["prompt"], so, False)[0]
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": cases[0][1]["prompt"]}], temperature=0,
                                            max_tokens=60, stream=True, extra_body={"structured_outputs": so})
    streamed = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    check(streamed == whole, f"streamed {streamed!r} == whole {whole!r}")
    print(f"{name}: structured outputs: {checks} checks passed")
finally:
    server.terminate()
    server.wait(timeout=30)

#!/usr/bin/env python3
"""Images in chat messages, end to end through `mlx-serving serve` and the official `openai` client (#28).

On SmolVLM-rand (scripts/fetch-model.sh smolvlm-rand): for every chat of the reference set
(testdata/reference/greedy-SmolVLM-rand-mlx-vlm.json, images as PNG data: URLs) `/tokenize` gives mlx-vlm's
prompt ids, `usage.prompt_tokens` counts them, and the greedy ids equal mlx-vlm's (f32) or first differ at a
near-tie (top-1/top-2 gap < 0.25); the same chats four at a time give the same ids, streamed too. A repeated
image is not encoded again (`vision_encoder_seconds_count`). Bad images are 400s naming the part; a text-only
model answers an image part with a 400. Limits from runtime.yaml, files under image_dirs, and remote images
from a loopback HTTP server (allow_remote_images, allow_private_image_hosts): the same ids as the data: URL, a
404 and a redirect to loopback refused with 400s.

On Qwen2.5-VL-rand (scripts/fetch-model.sh qwen25vl-rand), when given: `/tokenize` and `usage.prompt_tokens`
give transformers' prompt ids (testdata/reference/qwen25vl-rand-transformers.json), greedy ids match its or
first differ at a near-tie, four at a time the same.

Usage: tests/vision_server.py BINARY SMOLVLM_DIR TEXT_MODEL [QWEN25VL_DIR]
"""
import base64, json, os, sys, tempfile, threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import check, http, metrics, start, stop  # noqa: E402
from openai import OpenAI, BadRequestError  # noqa: E402

binary, vlm, text_model = sys.argv[1], sys.argv[2], sys.argv[3]
qwen = sys.argv[4] if len(sys.argv) > 4 else None
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
REF = json.load(open(os.path.join(ROOT, "testdata/reference/greedy-SmolVLM-rand-mlx-vlm.json")))
IMAGES = os.path.join(ROOT, "testdata/images")
NEAR_TIE = 0.25


def data_url(name):
    with open(os.path.join(IMAGES, name), "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def openai_messages(item):
    out = []
    for m in item["prompt"]:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "image_url", "image_url": {"url": data_url(p["image"])}} if p["type"] == "image"
                       else {"type": "text", "text": p["text"]} for p in content]
        out.append({"role": m["role"], "content": content})
    return out


def compare(item, got):
    want, gaps = item["output_ids"], item["step_gaps"]
    k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if k is None:
        return len(got) == len(want), "identical" if len(got) == len(want) else f"length {len(got)} vs {len(want)}"
    return gaps[k] < NEAR_TIE, f"first differs at {k} (gap {gaps[k]})"


proc, port = start(binary, ["--model", vlm, "--served-model-name", "vlm", "--threads", "2", "--kv-cache-mb", "128",
                            "--log-level", "warn"])
client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
items = REF["items"]


def chat(item, **kw):
    r = client.chat.completions.create(model="vlm", messages=openai_messages(item), max_tokens=32, temperature=0,
                                       extra_body={"return_token_ids": True}, **kw)
    return r.choices[0].model_extra["token_ids"], r.usage.prompt_tokens


alone = {}
for item in items:
    st, _, tok = http(port, "POST", "/tokenize", {"model": "vlm", "messages": openai_messages(item)})
    check(st == 200 and tok["tokens"] == item["prompt_ids"], f"{item['id']}: /tokenize gives the reference prompt ids")
    ids, prompt_tokens = chat(item)
    check(prompt_tokens == len(item["prompt_ids"]), f"{item['id']}: usage.prompt_tokens counts the image tokens")
    ok, how = compare(item, ids)
    check(ok, f"{item['id']}: greedy ids match mlx-vlm ({how})")
    alone[item["id"]] = ids

# Four at a time, and streamed: the same ids.
for start_i in range(0, len(items), 4):
    group = items[start_i:start_i + 4]
    got = {}
    threads = [threading.Thread(target=lambda it=it: got.__setitem__(it["id"], chat(it)[0])) for it in group]
    [t.start() for t in threads]
    [t.join() for t in threads]
    check(all(got[it["id"]] == alone[it["id"]] for it in group), f"items {start_i}..: four at a time, the same ids")
stream = client.chat.completions.create(model="vlm", messages=openai_messages(items[0]), max_tokens=32, temperature=0,
                                        stream=True)
text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
check(text == items[0]["output_text"] or items[0]["output_text"].startswith(text),
      f"streamed text is the reference's ({text[:40]!r})")

# A repeated image is not encoded again; the metrics count images.
before = metrics(port)
encodes = lambda m: m.get('mlx_serving:vision_encoder_seconds_count{model_name="vlm"}', 0)  # noqa: E731
chat(items[0])
after = metrics(port)
check(encodes(after) == encodes(before), "the same image again: no encoder run (prefix or encoder cache)")
check(after.get('mlx_serving:images_processed_total{model_name="vlm"}', 0) > 0, "images_processed_total counts images")
check(encodes(after) >= 1, "vision_encoder_seconds counts encoder runs")
st, _, models = http(port, "GET", "/v1/models")
check(models["data"][0]["capabilities"]["vision"] is True, "/v1/models: the model takes images")


def bad(messages, field, needle):
    try:
        client.chat.completions.create(model="vlm", messages=messages, max_tokens=4)
        check(False, f"{needle}: refused")
    except BadRequestError as e:
        err = e.body if isinstance(e.body, dict) else {}
        check(e.status_code == 400 and err.get("param") == field and needle in err.get("message", ""),
              f"400 naming {field}: {err.get('message')}")


part = lambda url: {"type": "image_url", "image_url": {"url": url}}  # noqa: E731
text = {"type": "text", "text": "What is this?"}
bad([{"role": "user", "content": [text, part("data:image/png;base64,!!notbase64!!")]}],
    "messages[0].content[1].image_url", "base64")
bad([{"role": "user", "content": [part("data:image/png;base64," + base64.b64encode(b"not an image").decode())]}],
    "messages[0].content[0].image_url", "not an image")
bad([{"role": "user", "content": [part("https://example.com/cat.png")]}], "messages[0].content[0].image_url", "allow_remote_images")
bad([{"role": "user", "content": [part(os.path.join(IMAGES, "red_circle_512.png"))]}],
    "messages[0].content[0].image_url", "image_dirs")
bad([{"role": "user", "content": [part(data_url("red_circle_512.png"))] * 9}], "messages[0].content[8].image_url",
    "at most 8 images")
# Still serving after all that.
ids, _ = chat(items[5])
check(ids == alone[items[5]["id"]], "the server still answers the same after bad requests")
stop(proc)

# Limits from runtime.yaml: a pixel bound and an image directory.
with tempfile.TemporaryDirectory() as d:
    cfg = os.path.join(d, "runtime.yaml")
    with open(cfg, "w") as f:
        f.write(f"server:\n  max_image_pixels: 100000\n  max_image_mb_in_flight: 20\n"
                f"  image_dirs: [{json.dumps(IMAGES)}]\n"
                f"  allow_remote_images: true\n  allow_private_image_hosts: true\n"
                f"  remote_image_timeout_seconds: 5\n")
    proc, port = start(binary, ["--config", cfg, "--model", vlm, "--served-model-name", "vlm", "--threads", "2",
                                "--kv-cache-mb", "128", "--log-level", "warn"])
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    bad([{"role": "user", "content": [part(data_url("red_circle_512.png"))]}], "messages[0].content[0].image_url",
        "over the limit of 100000 pixels")
    # Two 5-tile images (2 x 15.7 MB of pixels) are over a 20 MB in-flight budget: 429, and nothing stays held.
    two = [part("file://" + os.path.join(IMAGES, "green_square_96x64.png"))] * 2
    st, _, body = http(port, "POST", "/v1/chat/completions", {"model": "vlm", "max_tokens": 2, "messages": [
        {"role": "user", "content": two}]})
    check(st == 429 and "in flight" in body["error"]["message"], f"over the pixel budget: 429 ({st})")
    r = client.chat.completions.create(
        model="vlm", max_tokens=32, temperature=0, extra_body={"return_token_ids": True},
        messages=[{"role": "user", "content": [part("file://" + os.path.join(IMAGES, "green_square_96x64.png")),
                                               {"type": "text", "text": "Describe this image."}]}])
    check(r.choices[0].model_extra["token_ids"] == chat({"prompt": [{"role": "user", "content": [
        {"type": "image", "image": "green_square_96x64.png"}, {"type": "text", "text": "Describe this image."}]}]})[0],
        "a file under image_dirs reads as the same image as its data: URL")
    # Remote images from an HTTP server on loopback (allowed for the URL as given by allow_private_image_hosts,
    # never for a redirect's target).
    class Images(SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=IMAGES, **kw)

        def do_GET(self):
            if self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/green_square_96x64.png")
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                super().do_GET()

        def log_message(self, *a):
            pass

    files = ThreadingHTTPServer(("127.0.0.1", 0), Images)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files.server_port}"
    r = client.chat.completions.create(
        model="vlm", max_tokens=32, temperature=0, extra_body={"return_token_ids": True},
        messages=[{"role": "user", "content": [part(base + "/green_square_96x64.png"),
                                               {"type": "text", "text": "Describe this image."}]}])
    check(r.choices[0].model_extra["token_ids"] == chat({"prompt": [{"role": "user", "content": [
        {"type": "image", "image": "green_square_96x64.png"}, {"type": "text", "text": "Describe this image."}]}]})[0],
        "an image fetched over http reads as the same image as its data: URL")
    bad([{"role": "user", "content": [text, part(base + "/no_such.png")]}], "messages[0].content[1].image_url", "404")
    bad([{"role": "user", "content": [part(base + "/moved")]}], "messages[0].content[0].image_url", "non-public")
    files.shutdown()
    stop(proc)

# A text-only model: an image part is a 400.
proc, port = start(binary, ["--model", text_model, "--served-model-name", "text", "--threads", "2", "--log-level", "warn"])
client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
try:
    client.chat.completions.create(model="text", max_tokens=4, messages=[{"role": "user", "content": [
        text, part(data_url("red_circle_512.png"))]}])
    check(False, "a text-only model refuses images")
except BadRequestError as e:
    check(e.body.get("param") == "messages[0].content[1]" and "does not take images" in e.body.get("message", ""),
          f"a text-only model: 400 naming the image part ({e.body.get('message')})")
stop(proc)

if qwen:
    QREF = json.load(open(os.path.join(ROOT, "testdata/reference/qwen25vl-rand-transformers.json")))
    proc, port = start(binary, ["--model", qwen, "--served-model-name", "qvl", "--threads", "2", "--kv-cache-mb", "128",
                                "--log-level", "warn"])
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")

    def qmessages(item):
        return [{"role": m["role"], "content": [
            part(data_url(p["image_url"]["url"])) if p["type"] == "image_url" else p for p in m["content"]]}
            for m in item["messages"]]

    def qchat(item):
        r = client.chat.completions.create(model="qvl", messages=qmessages(item), max_tokens=12, temperature=0,
                                           extra_body={"return_token_ids": True, "ignore_eos": True})
        return r.choices[0].model_extra["token_ids"], r.usage.prompt_tokens

    qalone = {}
    for item in QREF["items"]:
        st, _, tok = http(port, "POST", "/tokenize", {"model": "qvl", "messages": qmessages(item)})
        check(st == 200 and tok["tokens"] == item["prompt_ids"], f"qwen {item['name']}: /tokenize gives the reference ids")
        ids, prompt_tokens = qchat(item)
        check(prompt_tokens == len(item["prompt_ids"]), f"qwen {item['name']}: usage.prompt_tokens counts image tokens")
        k = next((i for i, (a, b) in enumerate(zip(ids, item["greedy_ids"])) if a != b), None)
        check(k is None and len(ids) == len(item["greedy_ids"]) or k is not None and item["gaps"][k] < NEAR_TIE,
              f"qwen {item['name']}: greedy ids match transformers ({'identical' if k is None else f'near-tie at {k}'})")
        qalone[item["name"]] = ids
    group = QREF["items"][:4]
    got = {}
    threads = [threading.Thread(target=lambda it=it: got.__setitem__(it["name"], qchat(it)[0])) for it in group]
    [t.start() for t in threads]
    [t.join() for t in threads]
    check(all(got[it["name"]] == qalone[it["name"]] for it in group), "qwen: four at a time, the same ids")
    stop(proc)
print("vision_server: all checks passed")

// Models from local paths (with a draft model), chats, JSON-schema output and images, through the SDK in both
// modes, against the server's own answers over its OpenAI API.
import { readFileSync, writeFileSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ApiError, createEngine, ValidationError, type Engine } from "../src/index.js";
import { binary, model, root, startServer, type Server } from "./server.js";

const vlmDir = process.env.MLX_SERVING_TEST_VLM ?? path.join(root, "models/Qwen2.5-VL-rand");
const imageFile = path.join(root, "testdata/images/green_square_96x64.png");
const runtimeArgs = ["--model", model, "--served-model-name", "smol", "--threads", "1", "--kv-cache-mb", "64",
  "--log-level", "warn"];

// A server that registers models from paths, and one that does not; a spawned runtime.
let open: Server;
let closed: Server;
let overHttp: Engine;
let overStdio: Engine;

beforeAll(async () => {
  const dir = mkdtempSync(path.join(tmpdir(), "mlx-serving-sdk-"));
  const cfg = path.join(dir, "runtime.yaml");
  writeFileSync(cfg, "server:\n  allow_model_registration: true\n");
  [open, closed] = await Promise.all([startServer(["--config", cfg]), startServer()]);
  overHttp = await createEngine({ baseUrl: open.url });
  overStdio = await createEngine({ binaryPath: binary, runtimeArgs });
}, 120_000);

afterAll(async () => {
  await overStdio?.shutdown();
  await overHttp?.shutdown();
  await Promise.all([open?.stop(), closed?.stop()]);
});

async function post(server: Server, route: string, body: unknown) {
  const r = await fetch(`${server.url}${route}`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  return (await r.json()) as { choices: { text?: string; message?: { content: string }; token_ids: number[] }[] };
}

/** Token ids and text of a generation through the SDK. */
async function run(chunks: AsyncGenerator<{ type: string; tokenIds?: number[]; token?: string }>) {
  const ids: number[] = [];
  let text = "";
  for await (const c of chunks) {
    if (c.type === "token") {
      ids.push(...c.tokenIds!);
      text += c.token;
    }
  }
  return { ids, text };
}

const modes = () => [
  ["http", overHttp],
  ["stdio", overStdio],
] as const;

describe("models from local paths", () => {
  it("loads a model file under a new name, with a draft model, and serves the same greedy ids", async () => {
    const want = (await post(open, "/v1/completions", { model: "smol", prompt: "Once upon a time", max_tokens: 12,
      temperature: 0, return_token_ids: true })).choices[0]!.token_ids;
    for (const [mode, engine] of modes()) {
      const h = await engine.loadModel({ model: `second-${mode}`, localPath: model, draft: model });
      expect([h.id, h.loaded], mode).toEqual([`second-${mode}`, true]);
      const again = await engine.loadModel({ model: `second-${mode}`, localPath: model, draft: model });
      expect(again.loaded, mode).toBe(true);
      const got = await run(engine.createGenerator({ model: `second-${mode}`, prompt: "Once upon a time", maxTokens: 12,
        temperature: 0 }));
      expect(got.ids, mode).toEqual(want);
      expect((await engine.listModels()).map((m) => m.id), mode).toContain(`second-${mode}`);
      const taken = await engine.loadModel({ model: `second-${mode}`, localPath: model }).catch((e: unknown) => e);
      expect(taken, mode).toBeInstanceOf(ApiError);
      expect((taken as ApiError).code, mode).toMatch(/model_exists|-32009/);
      const missing = await engine.loadModel({ model: "x", localPath: "/nonexistent/model.gguf" }).catch((e: unknown) => e);
      expect(missing, mode).toBeInstanceOf(ApiError);
    }
  });

  it("a server that does not allow it refuses with a 403", async () => {
    const engine = await createEngine({ baseUrl: closed.url });
    const e = await engine.loadModel({ model: "more", localPath: model }).catch((x: unknown) => x);
    expect(e).toBeInstanceOf(ApiError);
    expect([(e as ApiError).status, (e as ApiError).code]).toEqual([403, "registration_disabled"]);
  });
});

describe("chats and structured output", () => {
  it("a chat gives the server's chat answer", async () => {
    const messages = [{ role: "user" as const, content: "Name three colours." }];
    const want = (await post(open, "/v1/chat/completions", { model: "smol", messages, max_tokens: 16, temperature: 0,
      return_token_ids: true })).choices[0]!;
    for (const [mode, engine] of modes()) {
      const got = await run(engine.createGenerator({ model: "smol", messages, maxTokens: 16, temperature: 0 }));
      expect(got.text, mode).toBe(want.message!.content);
      expect(got.ids, mode).toEqual(want.token_ids);
    }
  });

  it("`structured` gives JSON valid against the schema", async () => {
    const schema = {
      type: "object",
      properties: { name: { type: "string", maxLength: 20 }, age: { type: "integer", minimum: 0, maximum: 120 } },
      required: ["name", "age"],
      additionalProperties: false,
    };
    for (const [mode, engine] of modes()) {
      const text = await engine.generate({ model: "smol", prompt: "A person as JSON:", maxTokens: 64, temperature: 0,
        structured: { schema, format: "json" } });
      const v = JSON.parse(text) as { name: unknown; age: unknown };
      expect(Object.keys(v).sort(), mode).toEqual(["age", "name"]);
      expect(typeof v.name === "string" && Number.isInteger(v.age), mode).toBe(true);
    }
    expect(() => overHttp.createGenerator({ model: "smol", prompt: "x", structured: { schema, format: "yaml" } } as never))
      .toThrow(ValidationError);
    expect(() => overHttp.createGenerator({ model: "smol" })).toThrow(ValidationError);
    expect(() => overHttp.createGenerator({ model: "smol", prompt: "x", messages: [{ role: "user", content: "y" }] }))
      .toThrow(ValidationError);
  });
});

describe("vision models", () => {
  it("loadVisionModel and images as bytes, paths, base64 and data URLs give the server's answer", async () => {
    const bytes = readFileSync(imageFile);
    const url = `data:image/png;base64,${bytes.toString("base64")}`;
    for (const [mode, engine] of modes()) {
      const h = await engine.loadVisionModel({ model: "vlm", localPath: vlmDir });
      expect([h.id, h.vision], mode).toEqual(["vlm", true]);
    }
    const ref = (await post(open, "/v1/chat/completions", {
      model: "vlm",
      messages: [{ role: "user", content: [{ type: "image_url", image_url: { url } }, { type: "text", text: "What is this?" }] }],
      max_tokens: 8, temperature: 0, return_token_ids: true,
    })).choices[0]!.token_ids;
    expect(ref.length).toBe(8);
    const base = { model: "vlm", prompt: "What is this?", maxTokens: 8, temperature: 0 };
    for (const [mode, engine] of modes()) {
      for (const image of [{ source: bytes }, { source: imageFile }, { source: bytes.toString("base64") }, { source: url }]) {
        const got = await run(engine.createVisionGenerator({ ...base, image }));
        expect(got.ids, `${mode} ${typeof image.source === "string" ? image.source.slice(0, 16) : "bytes"}`).toEqual(ref);
      }
      const viaMultimodal = await run(engine.createGenerator({ ...base, multimodal: { images: [imageFile], imageFormat: "path" } }));
      expect(viaMultimodal.ids, mode).toEqual(ref);
      const text = await engine.loadVisionModel("smol").catch((e: unknown) => e);
      expect((text as ApiError).code, mode).toBe("not_a_vision_model");
    }
    await expect(run(overHttp.createVisionGenerator({ ...base, image: { source: Buffer.from("not an image") } })))
      .rejects.toBeInstanceOf(ValidationError);
    await expect(run(overStdio.createVisionGenerator({ ...base, image: { source: "/nonexistent/cat.png" } })))
      .rejects.toBeInstanceOf(ValidationError);
  });
});

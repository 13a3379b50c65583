import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  AbortError,
  ApiError,
  createEngine,
  MlxServingError,
  TimeoutError,
  TransportError,
  ValidationError,
  type Engine,
  type GeneratorChunk,
} from "../src/index.js";
import { direct, serverTokens, startServer, waitIdle, type Server } from "./server.js";

let server: Server;
let engine: Engine;

beforeAll(async () => {
  server = await startServer();
  engine = await createEngine({ baseUrl: server.url });
}, 120_000);

afterAll(async () => {
  await engine?.shutdown();
  await server?.stop();
});

describe("over HTTP", () => {
  it("lists, describes, unloads and loads the server's model", async () => {
    const models = await engine.listModels();
    expect(models.map((m) => m.id)).toEqual(["smol"]);
    const info = await engine.getModelInfo("smol");
    expect(info.loaded && info.maxModelLen! > 0).toBe(true);
    expect((await engine.getRuntimeInfo()).models).toEqual(["smol"]);
    await engine.unloadModel("smol");
    expect((await engine.getModelInfo("smol")).loaded).toBe(false);
    const handle = await engine.loadModel("smol");
    expect(handle.id).toBe("smol");
    expect(handle.loaded).toBe(true);
  });

  it("streams the server's greedy tokens, then the stats", async () => {
    const want = await direct(server, "The capital of France is", 24);
    const chunks: GeneratorChunk[] = [];
    for await (const c of engine.createGenerator({ model: "smol", prompt: "The capital of France is", maxTokens: 24, temperature: 0 })) {
      chunks.push(c);
    }
    const tokens = chunks.filter((c) => c.type === "token");
    expect(tokens.map((c) => c.token).join("")).toBe(want.text);
    expect(tokens.flatMap((c) => c.tokenIds)).toEqual(want.token_ids);
    const last = chunks[chunks.length - 1]!;
    expect(last.type).toBe("metadata");
    if (last.type === "metadata") {
      expect(last.stats.tokensGenerated).toBe(want.token_ids.length);
      expect(last.stats.promptTokens).toBeGreaterThan(0);
      expect(last.stats.finishReason).toMatch(/length|stop/);
      expect(last.stats.timeToFirstTokenMs).toBeGreaterThan(0);
    }
    const text = await engine.generate({ model: "smol", prompt: "The capital of France is", maxTokens: 24, temperature: 0 });
    expect(text).toBe(want.text);
  });

  it("honours every sampling field (seeded sampling repeats; stop sequences stop)", async () => {
    const p = { model: "smol", prompt: "Once upon a time", maxTokens: 16, temperature: 0.9, topP: 0.9, topK: 40,
      minP: 0.01, seed: 7, repetitionPenalty: 1.1, frequencyPenalty: 0.1, presencePenalty: 0.1 };
    expect(await engine.generate(p)).toBe(await engine.generate(p));
    const stopped = await engine.generate({ model: "smol", prompt: "Count: 1, 2, 3,", maxTokens: 32, temperature: 0,
      stopSequences: ["5"] });
    expect(stopped).not.toContain("5");
    const long = await engine.generate({ model: "smol", prompt: "Hi", maxTokens: 40, temperature: 0, ignoreEos: true });
    const n = (await engine.tokenize({ model: "smol", text: long, addBos: false })).tokens.length;
    expect(n).toBeGreaterThan(30);
  });

  it("tokenizes as the server's /tokenize does", async () => {
    const want = await serverTokens(server, "Hello, world!");
    expect((await engine.tokenize({ model: "smol", text: "Hello, world!" })).tokens).toEqual(want);
  });

  it("cancels in the engine on break and on abort", async () => {
    const gen = engine.createGenerator({ model: "smol", prompt: "Tell me a long story.", maxTokens: 2000, ignoreEos: true });
    let seen = 0;
    for await (const c of gen) {
      if (c.type === "token" && ++seen === 3) break;
    }
    expect(await waitIdle(() => engine.healthCheck())).toBe(true);
    const ctl = new AbortController();
    const chunks = engine.createGenerator({ model: "smol", prompt: "Tell me a long story.", maxTokens: 2000, ignoreEos: true },
      { signal: ctl.signal });
    const read = (async () => {
      for await (const c of chunks) if (c.type === "token") ctl.abort();
    })();
    await expect(read).rejects.toBeInstanceOf(AbortError);
    expect(await waitIdle(() => engine.healthCheck())).toBe(true);
    const slow = engine.generate({ model: "smol", prompt: "Tell me a long story.", maxTokens: 2000, ignoreEos: true },
      { timeoutMs: 200 });
    await expect(slow).rejects.toBeInstanceOf(TimeoutError);
    expect(await waitIdle(() => engine.healthCheck())).toBe(true);
  });

  it("validates every input before sending it", async () => {
    const bad = [
      () => engine.createGenerator({ model: "smol", prompt: "x", maxTokens: 0 }),
      () => engine.createGenerator({ model: "smol", prompt: "x", temperature: -1 }),
      () => engine.createGenerator({ model: "", prompt: "x" }),
      () => engine.createGenerator({ model: "smol", prompt: "x", colour: "blue" } as never),
      () => engine.createGenerator({ model: "smol", prompt: "x" }, { priority: "urgent" } as never),
    ];
    for (const b of bad) expect(b).toThrow(ValidationError);
    try {
      engine.createGenerator({ model: "smol", prompt: "x", topP: 2 });
    } catch (e) {
      expect((e as ValidationError).issues[0]!.path).toBe("params.topP");
    }
    await expect(engine.tokenize({ model: "smol" } as never)).rejects.toBeInstanceOf(ValidationError);
    await expect(createEngine({ baseUrl: "not a url" })).rejects.toBeInstanceOf(ValidationError);
  });

  it("turns the server's refusals and an unreachable server into typed errors", async () => {
    const e = await engine.generate({ model: "nope", prompt: "x" }).catch((x: unknown) => x);
    expect(e).toBeInstanceOf(ApiError);
    expect((e as ApiError).status).toBe(404);
    await expect(engine.loadModel({ model: "smol", localPath: "/tmp/x.gguf" })).rejects.toMatchObject({
      status: 403,
      code: "registration_disabled",
    });
    const gone = await createEngine({ baseUrl: "http://127.0.0.1:9" });
    await expect(gone.listModels()).rejects.toBeInstanceOf(TransportError);
    const none = await createEngine({ binaryPath: "/nonexistent/mlx-serving" });
    await expect(none.listModels()).rejects.toBeInstanceOf(TransportError);
    await expect(none.listModels()).rejects.toBeInstanceOf(MlxServingError);
  });
});

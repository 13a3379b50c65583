import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  AbortError,
  ApiError,
  createEngine,
  TimeoutError,
  TransportError,
  ValidationError,
  type Engine,
  type GeneratorChunk,
} from "../src/index.js";
import { binary, direct, model, serverTokens, startServer, waitIdle, type Server } from "./server.js";

// The same model behind a server (for reference answers) and a spawned `mlx-serving rpc`.
let server: Server;
let engine: Engine;
const runtimeArgs = ["--model", model, "--served-model-name", "smol", "--threads", "1", "--kv-cache-mb", "64",
  "--log-level", "warn"];

beforeAll(async () => {
  server = await startServer();
  engine = await createEngine({ binaryPath: binary, runtimeArgs });
}, 120_000);

afterAll(async () => {
  await engine?.shutdown();
  await server?.stop();
});



describe("over stdio (mlx-serving rpc)", () => {
  it("streams the server's greedy tokens, several at once over one pipe", async () => {
    const prompts = ["The capital of France is", "Once upon a time", "def fibonacci(n):"];
    const want = await Promise.all(prompts.map((p) => direct(server, p, 16)));
    const got = await Promise.all(
      prompts.map(async (prompt) => {
        const chunks: GeneratorChunk[] = [];
        for await (const c of engine.createGenerator({ model: "smol", prompt, maxTokens: 16, temperature: 0 })) chunks.push(c);
        return chunks;
      }),
    );
    for (const [k, chunks] of got.entries()) {
      const tokens = chunks.filter((c) => c.type === "token");
      expect(tokens.map((c) => c.token).join("")).toBe(want[k]!.text);
      expect(tokens.flatMap((c) => c.tokenIds)).toEqual(want[k]!.token_ids);
      const last = chunks[chunks.length - 1]!;
      expect(last.type === "metadata" && last.stats.tokensGenerated === 16 && last.stats.finishReason === "length").toBe(true);
    }
    expect((await engine.getRuntimeInfo()).models).toEqual(["smol"]);
    expect((await engine.listModels()).map((m) => m.id)).toEqual(["smol"]);
  });

  it("tokenizes as the server does; validates; refuses unknown models", async () => {
    const want = await serverTokens(server, "Hello, world!");
    expect((await engine.tokenize({ model: "smol", text: "Hello, world!" })).tokens).toEqual(want);
    expect(() => engine.createGenerator({ model: "smol", prompt: "x", maxTokens: -1 })).toThrow(ValidationError);
    const e = await engine.generate({ model: "nope", prompt: "x" }).catch((x: unknown) => x);
    expect(e).toBeInstanceOf(ApiError);
    expect((e as ApiError).status).toBe(404);
  });

  it("cancels in the engine on break, abort and timeout", async () => {
    const long = { model: "smol", prompt: "Tell me a long story.", maxTokens: 2000, ignoreEos: true };
    let n = 0;
    for await (const c of engine.createGenerator(long)) if (c.type === "token" && ++n === 3) break;
    expect(await waitIdle(() => engine.healthCheck())).toBe(true);
    const ctl = new AbortController();
    const read = (async () => {
      for await (const c of engine.createGenerator(long, { signal: ctl.signal })) if (c.type === "token") ctl.abort();
    })();
    await expect(read).rejects.toBeInstanceOf(AbortError);
    expect(await waitIdle(() => engine.healthCheck())).toBe(true);
    await expect(engine.generate(long, { timeoutMs: 200 })).rejects.toBeInstanceOf(TimeoutError);
    expect(await waitIdle(() => engine.healthCheck())).toBe(true);
  });

  it("fails pending calls when the runtime dies, and restarts it on the next call", async () => {
    const e = await createEngine({ binaryPath: binary, runtimeArgs });
    const gen = e.createGenerator({ model: "smol", prompt: "Tell me a long story.", maxTokens: 2000, ignoreEos: true });
    const first = await gen.next();
    expect(first.value?.type).toBe("token");
    const pid = e.runtimePid!;
    process.kill(pid, "SIGKILL");
    await expect((async () => {
      for await (const _ of gen) {
        // drain until the failure
      }
    })()).rejects.toBeInstanceOf(TransportError);
    const text = await e.generate({ model: "smol", prompt: "The capital of France is", maxTokens: 8, temperature: 0 });
    expect(text).toBe((await direct(server, "The capital of France is", 8)).text);
    expect(e.runtimePid).not.toBe(pid);
    await e.shutdown();
  });
});

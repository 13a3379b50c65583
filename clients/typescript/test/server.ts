// A real `mlx-serving serve` for the tests: the binary from MLX_SERVING_BIN (else the repository's debug build)
// on SmolLM2 (MLX_SERVING_TEST_MODEL, else the repository's models/), on a free port, stopped after the tests.
import { spawn, type ChildProcess } from "node:child_process";
import { createServer } from "node:net";
import { fileURLToPath } from "node:url";
import path from "node:path";

export const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
export const binary = process.env.MLX_SERVING_BIN ?? path.join(root, "target/debug/mlx-serving");
export const model = process.env.MLX_SERVING_TEST_MODEL ?? path.join(root, "models/SmolLM2-135M-Instruct.Q4_1.gguf");

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.listen(0, "127.0.0.1", () => {
      const a = s.address();
      s.close(() => (a && typeof a === "object" ? resolve(a.port) : reject(new Error("no port"))));
    });
  });
}

export interface Server {
  url: string;
  proc: ChildProcess;
  stop(): Promise<void>;
}

export async function startServer(args: string[] = []): Promise<Server> {
  const port = await freePort();
  const proc = spawn(binary, ["serve", "--model", model, "--served-model-name", "smol", "--port", String(port),
    "--threads", "1", "--kv-cache-mb", "64", "--log-level", "warn", ...args], { stdio: ["ignore", "ignore", "inherit"] });
  const url = `http://127.0.0.1:${port}`;
  for (let i = 0; i < 600; i++) {
    if (proc.exitCode !== null) throw new Error(`the server exited with ${proc.exitCode}`);
    try {
      if ((await fetch(`${url}/health`)).ok) break;
    } catch {
      // not listening yet
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  return {
    url,
    proc,
    stop: () =>
      new Promise((resolve) => {
        if (proc.exitCode !== null) return resolve();
        proc.once("exit", () => resolve());
        proc.kill("SIGTERM");
      }),
  };
}

/** The server's own greedy answer to `prompt`, through its OpenAI API. */
export async function direct(server: Server, prompt: string, maxTokens: number) {
  const r = await fetch(`${server.url}/v1/completions`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ model: "smol", prompt, max_tokens: maxTokens, temperature: 0, return_token_ids: true }),
  });
  return ((await r.json()) as { choices: { text: string; token_ids: number[] }[] }).choices[0]!;
}

/** The server's `/tokenize` of `text`. */
export async function serverTokens(server: Server, text: string): Promise<number[]> {
  const r = await fetch(`${server.url}/tokenize`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ model: "smol", prompt: text }),
  });
  return ((await r.json()) as { tokens: number[] }).tokens;
}

/** Waits (up to 5 s) until the engine behind `health` runs and queues nothing; whether it did. */
export async function waitIdle(health: () => Promise<{ running: number; waiting: number }>) {
  for (let i = 0; i < 100; i++) {
    const h = await health();
    if (h.running === 0 && h.waiting === 0) return true;
    await new Promise((r) => setTimeout(r, 50));
  }
  return false;
}

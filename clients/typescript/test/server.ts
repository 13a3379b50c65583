// A real `mlx-serving serve` for the tests: the binary from MLX_SERVING_BIN (else the repository's debug build)
// on SmolLM2 (MLX_SERVING_TEST_MODEL, else the repository's models/), on a free port, stopped after the tests.
import { spawn, type ChildProcess } from "node:child_process";
import { createServer } from "node:net";
import { fileURLToPath } from "node:url";
import path from "node:path";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
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

// Streams a completion from a running `mlx-serving serve` (default http://127.0.0.1:8080), token by token, then
// prints the stats. Build the package first (npm run build), then: node examples/stream.mjs [baseUrl] [model]
import { createEngine } from "mlx-serving";

const baseUrl = process.argv[2] ?? "http://127.0.0.1:8080";
const engine = await createEngine({ baseUrl });
const model = process.argv[3] ?? (await engine.listModels())[0].id;
const ctl = new AbortController();
process.on("SIGINT", () => ctl.abort());
for await (const chunk of engine.createGenerator(
  { model, prompt: "Write a haiku about autumn leaves.\n", maxTokens: 64, temperature: 0.7, seed: 1 },
  { signal: ctl.signal },
)) {
  if (chunk.type === "token") process.stdout.write(chunk.token);
  else console.log("\n", chunk.stats);
}
await engine.shutdown();

// The SDK over stdio (`mlx-serving rpc`) against the same requests over HTTP with the official `openai` npm
// client (`mlx-serving serve`), on the same binary and model, one side at a time, interleaved round by round.
// Per request: time to first token (first chunk with text) and decode tokens/s ((tokens - 1) / (last - first)).
// Prints medians per side and the stdio/HTTP ratios.
//
// Usage (after npm run build and `npm install --no-save openai@5`, which leaves package.json as it is):
//   node bench/sdk-vs-openai.mjs [--binary ../../target/release/mlx-serving]
//   [--model ../../models/SmolLM2-135M-Instruct.Q4_1.gguf] [--rounds 3] [--requests 16] [--max-tokens 64]
import { spawn } from "node:child_process";
import { createServer } from "node:net";
import OpenAI from "openai";
import { createEngine } from "mlx-serving";

const arg = (name, dflt) => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : dflt;
};
const binary = arg("binary", "../../target/release/mlx-serving");
const model = arg("model", "../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
const rounds = Number(arg("rounds", "3"));
const requests = Number(arg("requests", "16"));
const maxTokens = Number(arg("max-tokens", "64"));
const threads = arg("threads", "2");
const common = ["--model", model, "--served-model-name", "smol", "--threads", threads, "--kv-cache-mb", "256",
  "--no-prefix-caching", "--log-level", "warn"];
const prompts = Array.from({ length: requests }, (_, i) => `Write a short story about a robot, number ${i}:`);

const port = await new Promise((resolve) => {
  const s = createServer();
  s.listen(0, "127.0.0.1", () => {
    const p = s.address().port;
    s.close(() => resolve(p));
  });
});
const server = spawn(binary, ["serve", "--port", String(port), ...common], { stdio: ["ignore", "ignore", "inherit"] });
for (let i = 0; i < 600; i++) {
  try {
    if ((await fetch(`http://127.0.0.1:${port}/health`)).ok) break;
  } catch {}
  await new Promise((r) => setTimeout(r, 100));
}
const openai = new OpenAI({ baseURL: `http://127.0.0.1:${port}/v1`, apiKey: "none" });
const engine = await createEngine({ binaryPath: binary, runtimeArgs: common });

async function viaSdk(prompt) {
  const t0 = performance.now();
  let first, last, tokens = 0;
  for await (const c of engine.createGenerator({ model: "smol", prompt, maxTokens, temperature: 0, ignoreEos: true })) {
    if (c.type !== "token" || !c.token) continue;
    last = performance.now();
    first ??= last;
    tokens += c.tokenIds.length;
  }
  return { ttft: first - t0, tps: ((tokens - 1) * 1000) / (last - first), tokens };
}

async function viaOpenai(prompt) {
  const t0 = performance.now();
  let first, last, tokens = 0;
  const stream = await openai.completions.create({ model: "smol", prompt, max_tokens: maxTokens, temperature: 0,
    stream: true, stream_options: { include_usage: true }, ignore_eos: true });
  for await (const c of stream) {
    if (c.usage) tokens = c.usage.completion_tokens;
    if (!c.choices?.[0]?.text) continue;
    last = performance.now();
    first ??= last;
  }
  return { ttft: first - t0, tps: ((tokens - 1) * 1000) / (last - first), tokens };
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
await viaSdk("warm up");
await viaOpenai("warm up");
const sides = { stdio: [], http: [] };
for (let r = 0; r < rounds; r++) {
  for (const [name, run] of [["stdio", viaSdk], ["http", viaOpenai]]) {
    for (const p of prompts) sides[name].push(await run(p));
  }
  console.error(`round ${r + 1}/${rounds} done`);
}
const summary = {};
for (const [name, xs] of Object.entries(sides)) {
  summary[name] = { requests: xs.length, ttft_ms_p50: median(xs.map((x) => x.ttft)), tokens_per_s_p50: median(xs.map((x) => x.tps)),
    tokens: xs.reduce((a, x) => a + x.tokens, 0) };
}
summary.ratio = { ttft_stdio_over_http: summary.stdio.ttft_ms_p50 / summary.http.ttft_ms_p50,
  tokens_per_s_stdio_over_http: summary.stdio.tokens_per_s_p50 / summary.http.tokens_per_s_p50 };
console.log(JSON.stringify(summary, null, 1));
await engine.shutdown();
server.kill("SIGTERM");

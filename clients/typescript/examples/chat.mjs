// A streaming chat over a spawned runtime (stdio): each line you type is a user turn; the answer streams back.
// Build the package first (npm run build), then:
//   MLX_SERVING_BIN=../../target/release/mlx-serving node examples/chat.mjs ../../models/SmolLM2-135M-Instruct.Q4_1.gguf
import { createInterface } from "node:readline/promises";
import { createEngine } from "mlx-serving";

const file = process.argv[2] ?? "models/SmolLM2-135M-Instruct.Q4_1.gguf";
const engine = await createEngine();
const model = await engine.loadModel({ model: "chat", localPath: file });
const messages = [{ role: "system", content: "You are a helpful assistant." }];
const rl = createInterface({ input: process.stdin, output: process.stdout });
for (;;) {
  const line = await rl.question("> ").catch(() => null);
  if (line === null || line.trim() === "") break;
  messages.push({ role: "user", content: line });
  let answer = "";
  for await (const c of engine.createGenerator({ model: model.id, messages, maxTokens: 256, temperature: 0.7 })) {
    if (c.type === "token") {
      process.stdout.write(c.token);
      answer += c.token;
    } else {
      process.stdout.write(`\n  [${c.stats.tokensGenerated} tokens, ${c.stats.tokensPerSecond.toFixed(1)} tok/s]\n`);
    }
  }
  messages.push({ role: "assistant", content: answer });
}
rl.close();
await engine.shutdown();

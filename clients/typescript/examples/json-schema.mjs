// A JSON-schema call: the answer is constrained to JSON valid against the schema while it is generated.
// Build the package first (npm run build), then either against a running server:
//   node examples/json-schema.mjs http://127.0.0.1:8080 [model]
// or over a spawned runtime (MLX_SERVING_BIN or PATH) with a model file:
//   node examples/json-schema.mjs ../../models/SmolLM2-135M-Instruct.Q4_1.gguf
import { createEngine } from "mlx-serving";

const arg = process.argv[2] ?? "http://127.0.0.1:8080";
const http = /^https?:\/\//.test(arg);
const engine = await createEngine(http ? { baseUrl: arg } : {});
const model = http
  ? (process.argv[3] ?? (await engine.listModels())[0].id)
  : (await engine.loadModel({ model: "json", localPath: arg })).id;
const schema = {
  type: "object",
  properties: {
    city: { type: "string" },
    country: { type: "string" },
    population_millions: { type: "number", minimum: 0 },
    landmarks: { type: "array", items: { type: "string" }, minItems: 1, maxItems: 3 },
  },
  required: ["city", "country", "population_millions", "landmarks"],
  additionalProperties: false,
};
const text = await engine.generate({
  model,
  messages: [{ role: "user", content: "Describe Paris as JSON with its country, population and landmarks." }],
  structured: { schema, format: "json" },
  maxTokens: 200,
  temperature: 0,
});
console.log(JSON.parse(text));
await engine.shutdown();

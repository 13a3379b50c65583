import { z } from "zod";
import { ValidationError } from "./errors.js";

export const EngineOptionsSchema = z
  .object({
    /** Talk to a running `mlx-serving serve` at this URL instead of spawning a runtime. */
    baseUrl: z.url().optional(),
    /** The `mlx-serving` binary for the stdio runtime (else MLX_SERVING_BIN, else PATH). */
    binaryPath: z.string().min(1).optional(),
    /** A bearer token for a server started with API keys. */
    apiKey: z.string().min(1).optional(),
    /** Default timeout of every call, in milliseconds. */
    requestTimeoutMs: z.number().int().positive().optional(),
    /** Arguments for `mlx-serving rpc` (the models to serve and engine settings), e.g. ["--model", "x.gguf"]. */
    runtimeArgs: z.array(z.string()).optional(),
  })
  .strict();
export type EngineOptions = z.infer<typeof EngineOptionsSchema>;

export const LoadModelOptionsSchema = z
  .object({
    /** A model name known to the runtime's registry (or its Hugging Face cache id). */
    model: z.string().min(1),
    /** A model file or directory to load under `model` (stdio runtime only). */
    localPath: z.string().min(1).optional(),
    /** A draft model for speculative decoding. */
    draft: z.string().min(1).optional(),
  })
  .strict();
export type LoadModelOptions = z.infer<typeof LoadModelOptionsSchema>;

export const PrioritySchema = z.enum(["critical", "high", "normal", "low"]);
export type Priority = z.infer<typeof PrioritySchema>;

export const GeneratorParamsSchema = z
  .object({
    model: z.string().min(1),
    prompt: z.string(),
    maxTokens: z.number().int().positive().optional(),
    temperature: z.number().min(0).max(2).optional(),
    topP: z.number().gt(0).max(1).optional(),
    topK: z.number().int().min(0).optional(),
    minP: z.number().min(0).max(1).optional(),
    seed: z.number().int().min(0).optional(),
    stopSequences: z.array(z.string().min(1)).max(16).optional(),
    repetitionPenalty: z.number().gt(0).optional(),
    frequencyPenalty: z.number().min(-2).max(2).optional(),
    presencePenalty: z.number().min(-2).max(2).optional(),
    ignoreEos: z.boolean().optional(),
    logitBias: z.record(z.string().regex(/^\d+$/), z.number().min(-100).max(100)).optional(),
  })
  .strict();
export type GeneratorParams = z.infer<typeof GeneratorParamsSchema>;

export const GenerateOptionsSchema = z
  .object({
    signal: z.instanceof(AbortSignal).optional(),
    timeoutMs: z.number().int().positive().optional(),
    priority: PrioritySchema.optional(),
  })
  .strict();
export type GenerateOptions = z.infer<typeof GenerateOptionsSchema>;

export const TokenizeParamsSchema = z
  .object({
    model: z.string().min(1),
    text: z.string(),
    addBos: z.boolean().optional(),
  })
  .strict();
export type TokenizeParams = z.infer<typeof TokenizeParamsSchema>;

/** Parses `value` with `schema`, or throws a ValidationError naming every problem (`what.path: message`). */
export function validate<T>(schema: z.ZodType<T>, value: unknown, what: string): T {
  const r = schema.safeParse(value);
  if (r.success) return r.data;
  const issues = r.error.issues.map((i) => ({
    path: [what, ...i.path.map(String)].join("."),
    message: i.message,
  }));
  throw new ValidationError(issues.map((i) => `${i.path}: ${i.message}`).join("; "), issues);
}

/** The generation parameters as the runtime and the server name them (snake_case; unset ones left out). */
export function wireParams(p: GeneratorParams): Record<string, unknown> {
  const names: [keyof GeneratorParams, string][] = [
    ["maxTokens", "max_tokens"],
    ["temperature", "temperature"],
    ["topP", "top_p"],
    ["topK", "top_k"],
    ["minP", "min_p"],
    ["seed", "seed"],
    ["stopSequences", "stop"],
    ["repetitionPenalty", "repetition_penalty"],
    ["frequencyPenalty", "frequency_penalty"],
    ["presencePenalty", "presence_penalty"],
    ["ignoreEos", "ignore_eos"],
    ["logitBias", "logit_bias"],
  ];
  const out: Record<string, unknown> = { model: p.model, prompt: p.prompt };
  for (const [from, to] of names) if (p[from] !== undefined) out[to] = p[from];
  return out;
}

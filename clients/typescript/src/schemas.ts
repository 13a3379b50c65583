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
    /** A model name known to the runtime's registry, or a Hugging Face cache id (`org/name`). */
    model: z.string().min(1),
    /**
     * A model file or directory (on the runtime's machine) to serve under `model`. Over HTTP the server must
     * allow it (`server.allow_model_registration`); the stdio runtime always does.
     */
    localPath: z.string().min(1).optional(),
    /** A draft model's file or directory, for speculative decoding of `model` (registers it like `localPath`). */
    draft: z.string().min(1).optional(),
  })
  .strict();
export type LoadModelOptions = z.infer<typeof LoadModelOptionsSchema>;

/** `loadVisionModel`: as `loadModel`; the model must take images. */
export const LoadVisionModelOptionsSchema = LoadModelOptionsSchema;
export type LoadVisionModelOptions = LoadModelOptions;

const TextPartSchema = z.object({ type: z.literal("text"), text: z.string() }).strict();
const ImagePartSchema = z
  .object({
    type: z.literal("image_url"),
    image_url: z.object({ url: z.string().min(1), detail: z.string().optional() }).strict(),
  })
  .strict();

/** An OpenAI chat message (text, or text and image parts). */
export const ChatMessageSchema = z
  .object({
    role: z.enum(["system", "user", "assistant", "tool"]),
    content: z.union([z.string(), z.array(z.union([TextPartSchema, ImagePartSchema])).min(1)]),
    name: z.string().min(1).optional(),
  })
  .strict();
export type ChatMessage = z.infer<typeof ChatMessageSchema>;

/** The original's structured output: the answer is JSON valid against `schema` (constrained decoding). */
export const StructuredSchema = z
  .object({
    schema: z.record(z.string(), z.unknown()),
    /** Only `json` (the original also named `yaml`; refused rather than ignored). */
    format: z.literal("json").optional(),
    /** The schema's name in `response_format` (default `output`). */
    name: z.string().regex(/^[A-Za-z0-9_-]{1,64}$/).optional(),
  })
  .strict();

/**
 * The original's images for a vision model: each a file path (read here and sent as a `data:` URL), a
 * `data:`/`http(s)` URL (remote ones only where the server allows them), or bare base64.
 */
export const MultimodalSchema = z
  .object({
    images: z.array(z.string().min(1)).min(1).max(64),
    /** How to read every entry of `images`; default: by its look (URL, existing file, else base64). */
    imageFormat: z.enum(["base64", "url", "path"]).optional(),
  })
  .strict();

/** One image for `createVisionGenerator`: bytes, or a string as in `multimodal.images`. */
export const ImageInputSchema = z
  .object({
    source: z.union([z.string().min(1), z.instanceof(Uint8Array)]),
    format: z.enum(["png", "jpg", "jpeg", "webp", "gif"]).optional(),
  })
  .strict();
export type ImageInput = z.infer<typeof ImageInputSchema>;

export const PrioritySchema = z.enum(["critical", "high", "normal", "low"]);
export type Priority = z.infer<typeof PrioritySchema>;

const GeneratorFields = z
  .object({
    model: z.string().min(1),
    /** Text, or token ids (`{tokens: [...]}`); a chat uses `messages` instead. */
    prompt: z.union([z.string(), z.object({ tokens: z.array(z.number().int().min(0)).min(1) }).strict()]).optional(),
    /** A chat, rendered with the model's template (extension of the original, which took `prompt` only). */
    messages: z.array(ChatMessageSchema).min(1).max(1024).optional(),
    structured: StructuredSchema.optional(),
    multimodal: MultimodalSchema.optional(),
    minTokens: z.number().int().min(0).optional(),
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

export const GeneratorParamsSchema = GeneratorFields.superRefine((p, ctx) => {
  if ((p.prompt === undefined) === (p.messages === undefined)) {
    ctx.addIssue({ code: "custom", path: ["prompt"], message: "give exactly one of prompt and messages" });
  }
  if (p.multimodal && typeof p.prompt !== "string") {
    ctx.addIssue({ code: "custom", path: ["multimodal"], message: "images go with a text prompt (or as image parts of messages)" });
  }
});
export type GeneratorParams = z.infer<typeof GeneratorParamsSchema>;

/** `createVisionGenerator`: a text prompt and one or more images. */
export const VisionGeneratorParamsSchema = GeneratorFields.omit({ messages: true, multimodal: true })
  .extend({ prompt: z.string(), image: z.union([ImageInputSchema, z.array(ImageInputSchema).min(1).max(64)]) })
  .strict();
export type VisionGeneratorParams = z.infer<typeof VisionGeneratorParamsSchema>;

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

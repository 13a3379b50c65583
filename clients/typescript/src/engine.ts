import { ApiError, MlxServingError } from "./errors.js";
import { HttpTransport } from "./http.js";
import { imagePart, inputUrl } from "./request.js";
import { RpcTransport } from "./rpc.js";
import {
  EngineOptionsSchema,
  GenerateOptionsSchema,
  GeneratorParamsSchema,
  LoadModelOptionsSchema,
  LoadVisionModelOptionsSchema,
  TokenizeParamsSchema,
  VisionGeneratorParamsSchema,
  validate,
  type EngineOptions,
  type GenerateOptions,
  type GeneratorParams,
  type LoadModelOptions,
  type LoadVisionModelOptions,
  type TokenizeParams,
  type VisionGeneratorParams,
} from "./schemas.js";
import type { Transport } from "./transport.js";
import type { GeneratorChunk, Health, ModelHandle, ModelInfo, RuntimeInfo } from "./types.js";

/** The original mlx-serving Engine API over a runtime or a server. */
export class Engine {
  private closed = false;

  constructor(
    private readonly transport: Transport,
    private readonly timeoutMs?: number,
  ) {}

  /** The spawned runtime's process id (stdio mode; undefined before the first call and over HTTP). */
  get runtimePid(): number | undefined {
    return this.transport instanceof RpcTransport ? this.transport.pid : undefined;
  }

  private open(): Transport {
    if (this.closed) throw new MlxServingError("the engine is shut down", "engine_closed");
    return this.transport;
  }

  /** Loads a model (by name, or a name plus `localPath`) and returns its handle. */
  async loadModel(options: LoadModelOptions | string): Promise<ModelHandle> {
    const o = validate(LoadModelOptionsSchema, typeof options === "string" ? { model: options } : options, "loadModel");
    return this.open().loadModel(o, this.timeoutMs);
  }

  /** Loads a model that takes images (as `loadModel`); a text-only model is refused with `not_a_vision_model`. */
  async loadVisionModel(options: LoadVisionModelOptions | string): Promise<ModelHandle> {
    const o = validate(
      LoadVisionModelOptionsSchema,
      typeof options === "string" ? { model: options } : options,
      "loadVisionModel",
    );
    const m = await this.open().loadModel(o, this.timeoutMs);
    if (!m.vision) {
      throw new ApiError(`the model \`${m.id}\` does not take images`, "not_a_vision_model", undefined, "model");
    }
    return m;
  }

  async unloadModel(id: string): Promise<void> {
    const m = validate(LoadModelOptionsSchema.pick({ model: true }), { model: id }, "unloadModel");
    return this.open().unloadModel(m.model, this.timeoutMs);
  }

  async listModels(): Promise<ModelInfo[]> {
    return this.open().listModels(this.timeoutMs);
  }

  async getModelInfo(id: string): Promise<ModelInfo> {
    const m = validate(LoadModelOptionsSchema.pick({ model: true }), { model: id }, "getModelInfo");
    return this.open().getModelInfo(m.model, this.timeoutMs);
  }

  /**
   * Streams a generation: `{type: "token"}` chunks, then one `{type: "metadata"}` with its stats. Breaking out
   * of `for await`, or the signal, cancels it in the engine.
   */
  createGenerator(params: GeneratorParams, options: GenerateOptions = {}): AsyncGenerator<GeneratorChunk> {
    const p = validate(GeneratorParamsSchema, params, "params");
    const o = validate(GenerateOptionsSchema, options, "options");
    return this.open().generate(p, { ...o, timeoutMs: o.timeoutMs ?? this.timeoutMs });
  }

  /**
   * Streams a generation about one or more images (`image`: bytes, a file path, a `data:`/`http(s)` URL, or
   * base64), asked with `prompt`; as `createGenerator` otherwise. The images go first in one user message.
   */
  createVisionGenerator(params: VisionGeneratorParams, options: GenerateOptions = {}): AsyncGenerator<GeneratorChunk> {
    const { image, prompt, ...rest } = validate(VisionGeneratorParamsSchema, params, "params");
    const o = validate(GenerateOptionsSchema, options, "options");
    const transport = this.open();
    const timeoutMs = o.timeoutMs ?? this.timeoutMs;
    const images = Array.isArray(image) ? image : [image];
    return (async function* () {
      const urls = await Promise.all(
        images.map((img, i) => inputUrl(img, Array.isArray(image) ? `params.image.${i}` : "params.image")),
      );
      const content = [...urls.map(imagePart), { type: "text" as const, text: prompt }];
      yield* transport.generate({ ...rest, messages: [{ role: "user", content }] } as GeneratorParams, { ...o, timeoutMs });
    })();
  }

  /** The whole generated text. */
  async generate(params: GeneratorParams, options: GenerateOptions = {}): Promise<string> {
    let text = "";
    for await (const c of this.createGenerator(params, options)) if (c.type === "token") text += c.token;
    return text;
  }

  async tokenize(params: TokenizeParams): Promise<{ tokens: number[] }> {
    const p = validate(TokenizeParamsSchema, params, "params");
    return { tokens: await this.open().tokenize(p, this.timeoutMs) };
  }

  async getRuntimeInfo(): Promise<RuntimeInfo> {
    return this.open().runtimeInfo(this.timeoutMs);
  }

  async healthCheck(): Promise<Health> {
    return this.open().health(this.timeoutMs);
  }

  /** Ends the engine (and a spawned runtime); later calls fail with `engine_closed`. */
  async shutdown(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.transport.close();
  }

  async dispose(): Promise<void> {
    return this.shutdown();
  }
}

/**
 * An Engine: with `baseUrl`, over a running `mlx-serving serve`; else over a spawned `mlx-serving rpc` (the binary
 * from `binaryPath`, the MLX_SERVING_BIN environment variable, or PATH; `runtimeArgs` name its models), restarted
 * on the next call if it dies.
 */
export async function createEngine(options: EngineOptions = {}): Promise<Engine> {
  const o = validate(EngineOptionsSchema, options, "options");
  if (o.baseUrl) {
    return new Engine(new HttpTransport(o.baseUrl, o.apiKey, o.requestTimeoutMs), o.requestTimeoutMs);
  }
  const binary = o.binaryPath ?? process.env.MLX_SERVING_BIN ?? "mlx-serving";
  return new Engine(new RpcTransport(binary, o.runtimeArgs ?? [], o.requestTimeoutMs), o.requestTimeoutMs);
}

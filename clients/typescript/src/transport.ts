import type { GenerateOptions, GeneratorParams, LoadModelOptions, TokenizeParams } from "./schemas.js";
import type { GeneratorChunk, Health, ModelInfo, RuntimeInfo } from "./types.js";

/** What an Engine needs from the runtime: the stdio JSON-RPC runtime or a server over HTTP. */
export interface Transport {
  loadModel(o: LoadModelOptions, timeoutMs?: number): Promise<ModelInfo>;
  unloadModel(id: string, timeoutMs?: number): Promise<void>;
  listModels(timeoutMs?: number): Promise<ModelInfo[]>;
  getModelInfo(id: string, timeoutMs?: number): Promise<ModelInfo>;
  /** Streams a generation; stopping the iteration (or the signal) cancels it in the engine. */
  generate(p: GeneratorParams, o: GenerateOptions): AsyncGenerator<GeneratorChunk>;
  tokenize(p: TokenizeParams, timeoutMs?: number): Promise<number[]>;
  runtimeInfo(timeoutMs?: number): Promise<RuntimeInfo>;
  health(timeoutMs?: number): Promise<Health>;
  close(): Promise<void>;
}

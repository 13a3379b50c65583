export { Engine, createEngine } from "./engine.js";
export { AbortError, ApiError, MlxServingError, TimeoutError, TransportError, ValidationError } from "./errors.js";
export type {
  EngineOptions,
  GenerateOptions,
  GeneratorParams,
  LoadModelOptions,
  Priority,
  TokenizeParams,
} from "./schemas.js";
export type {
  GenerationStats,
  GeneratorChunk,
  Health,
  MetadataChunk,
  ModelHandle,
  ModelInfo,
  RuntimeInfo,
  TokenChunk,
} from "./types.js";

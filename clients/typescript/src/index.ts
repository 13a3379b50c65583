export { Engine, createEngine } from "./engine.js";
export { AbortError, ApiError, MlxServingError, TimeoutError, TransportError, ValidationError } from "./errors.js";
export type {
  ChatMessage,
  EngineOptions,
  GenerateOptions,
  GeneratorParams,
  ImageInput,
  LoadModelOptions,
  LoadVisionModelOptions,
  Priority,
  TokenizeParams,
  VisionGeneratorParams,
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

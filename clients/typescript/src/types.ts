/** One piece of generated text and the token ids behind it (several when a character spans tokens). */
export interface TokenChunk {
  type: "token";
  token: string;
  /** The last of `tokenIds`. */
  tokenId: number;
  tokenIds: number[];
}

export interface GenerationStats {
  promptTokens: number;
  tokensGenerated: number;
  /** Generated tokens per second after the first one. */
  tokensPerSecond: number;
  timeToFirstTokenMs: number;
  totalTimeMs: number;
  finishReason: string | null;
}

export interface MetadataChunk {
  type: "metadata";
  stats: GenerationStats;
}

export type GeneratorChunk = TokenChunk | MetadataChunk;

export interface ModelInfo {
  id: string;
  loaded: boolean;
  state: string;
  memoryBytes: number | null;
  maxModelLen: number | null;
  aliases: string[];
  vision: boolean;
}

export interface ModelHandle extends ModelInfo {}

export interface RuntimeInfo {
  mode: "stdio" | "http";
  endpoint: string;
  models: string[];
}

export interface Health {
  status: string;
  running: number;
  waiting: number;
}

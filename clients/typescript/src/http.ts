import { AbortError, ApiError, MlxServingError, TimeoutError, TransportError } from "./errors.js";
import { wireRequest } from "./request.js";
import type { GenerateOptions, GeneratorParams, LoadModelOptions, TokenizeParams } from "./schemas.js";
import type { Transport } from "./transport.js";
import type { GeneratorChunk, Health, ModelInfo, RuntimeInfo } from "./types.js";

type Json = Record<string, unknown>;

/** A model card of `/v1/models` as a ModelInfo. */
export function modelInfo(c: Json): ModelInfo {
  const caps = (c.capabilities ?? {}) as Json;
  return {
    id: String(c.id),
    loaded: c.loaded !== false,
    state: typeof c.state === "string" ? c.state : "loaded",
    memoryBytes: typeof c.memory_bytes === "number" ? c.memory_bytes : null,
    maxModelLen: typeof c.max_model_len === "number" ? c.max_model_len : null,
    aliases: Array.isArray(c.aliases) ? c.aliases.map(String) : [],
    vision: caps.vision === true,
  };
}

/** The server's error envelope (or whatever came back) as an ApiError. */
function apiError(status: number, body: unknown, text: string): ApiError {
  const e = (body as { error?: { message?: string; code?: string; param?: string | null } } | undefined)?.error;
  const message = e?.message ?? (text.slice(0, 200) || `HTTP ${status}`);
  return new ApiError(message, e?.code ?? `http_${status}`, status, e?.param ?? null);
}

/** An AbortSignal for one call: the caller's signal, and a timeout; `why()` says which fired. */
function callSignal(signal: AbortSignal | undefined, timeoutMs: number | undefined) {
  const ctl = new AbortController();
  let timedOut = false;
  const timer =
    timeoutMs === undefined
      ? undefined
      : setTimeout(() => {
          timedOut = true;
          ctl.abort();
        }, timeoutMs);
  const onAbort = () => ctl.abort();
  if (signal?.aborted) ctl.abort();
  signal?.addEventListener("abort", onAbort, { once: true });
  return {
    signal: ctl.signal,
    abort: () => ctl.abort(),
    why: (): MlxServingError | undefined =>
      timedOut ? new TimeoutError(`no answer within ${timeoutMs} ms`) : signal?.aborted ? new AbortError() : undefined,
    done: () => {
      if (timer) clearTimeout(timer);
      signal?.removeEventListener("abort", onAbort);
    },
  };
}

/** Talks to a running `mlx-serving serve` (or any server of its API) over HTTP. */
export class HttpTransport implements Transport {
  private readonly base: string;

  constructor(
    baseUrl: string,
    private readonly apiKey?: string,
    private readonly defaultTimeoutMs?: number,
  ) {
    const u = baseUrl.replace(/\/+$/, "");
    this.base = u.endsWith("/v1") ? u.slice(0, -3) : u;
  }

  private headers(): Record<string, string> {
    const h: Record<string, string> = { "content-type": "application/json" };
    if (this.apiKey) h.authorization = `Bearer ${this.apiKey}`;
    return h;
  }

  private async call(method: string, path: string, body?: unknown, timeoutMs?: number): Promise<Json> {
    const s = callSignal(undefined, timeoutMs ?? this.defaultTimeoutMs);
    try {
      const resp = await fetch(this.base + path, {
        method,
        headers: this.headers(),
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: s.signal,
      });
      const text = await resp.text();
      let json: unknown;
      try {
        json = text ? JSON.parse(text) : {};
      } catch {
        json = undefined;
      }
      if (!resp.ok) throw apiError(resp.status, json, text);
      if (json === undefined) throw new TransportError(`${path}: the server's answer is not JSON`);
      return json as Json;
    } catch (e) {
      if (e instanceof MlxServingError) throw e;
      throw s.why() ?? new TransportError(`${method} ${this.base}${path}: ${(e as Error).message}`, { cause: e });
    } finally {
      s.done();
    }
  }

  async loadModel(o: LoadModelOptions, timeoutMs?: number): Promise<ModelInfo> {
    if (o.localPath !== undefined || o.draft !== undefined) {
      // Registered from files on the server's machine (where the server allows it: else a 403 ApiError).
      const body = { id: o.model, path: o.localPath ?? null, draft_model: o.draft ?? null };
      return modelInfo(await this.call("POST", "/v1/models", body, timeoutMs));
    }
    return modelInfo(await this.call("POST", `/v1/models/${encodeURIComponent(o.model)}/load`, undefined, timeoutMs));
  }

  async unloadModel(id: string, timeoutMs?: number): Promise<void> {
    await this.call("POST", `/v1/models/${encodeURIComponent(id)}/unload`, undefined, timeoutMs);
  }

  async listModels(timeoutMs?: number): Promise<ModelInfo[]> {
    const r = await this.call("GET", "/v1/models", undefined, timeoutMs);
    return ((r.data ?? []) as Json[]).map(modelInfo);
  }

  async getModelInfo(id: string, timeoutMs?: number): Promise<ModelInfo> {
    return modelInfo(await this.call("GET", `/v1/models/${encodeURIComponent(id)}`, undefined, timeoutMs));
  }

  async tokenize(p: TokenizeParams, timeoutMs?: number): Promise<number[]> {
    const body = { model: p.model, prompt: p.text, add_special_tokens: p.addBos ?? true };
    const r = await this.call("POST", "/tokenize", body, timeoutMs);
    return (r.tokens ?? []) as number[];
  }

  async runtimeInfo(timeoutMs?: number): Promise<RuntimeInfo> {
    const models = await this.listModels(timeoutMs);
    return { mode: "http", endpoint: this.base, models: models.map((m) => m.id) };
  }

  async health(timeoutMs?: number): Promise<Health> {
    const r = await this.call("GET", "/health", undefined, timeoutMs);
    return { status: String(r.status), running: Number(r.running ?? 0), waiting: Number(r.waiting ?? 0) };
  }

  async close(): Promise<void> {}

  async *generate(p: GeneratorParams, o: GenerateOptions): AsyncGenerator<GeneratorChunk> {
    const req = await wireRequest(p);
    const endpoint = `${this.base}/v1/${req.chat ? "chat/completions" : "completions"}`;
    const body: Json = { ...req.body, stream: true, stream_options: { include_usage: true }, return_token_ids: true };
    if (o.priority) body.priority = o.priority;
    const s = callSignal(o.signal, o.timeoutMs ?? this.defaultTimeoutMs);
    const t0 = performance.now();
    let first: number | undefined;
    let finishReason: string | null = null;
    let usage: Json | undefined;
    let generated = 0;
    try {
      let resp: Response;
      try {
        resp = await fetch(endpoint, {
          method: "POST",
          headers: this.headers(),
          body: JSON.stringify(body),
          signal: s.signal,
        });
      } catch (e) {
        throw s.why() ?? new TransportError(`POST ${endpoint}: ${(e as Error).message}`, { cause: e });
      }
      if (!resp.ok || !resp.body) {
        const text = await resp.text();
        let json: unknown;
        try {
          json = JSON.parse(text);
        } catch {
          json = undefined;
        }
        throw apiError(resp.status, json, text);
      }
      const decoder = new TextDecoder();
      let buf = "";
      const reader = resp.body.getReader();
      try {
        for (;;) {
          const next = await reader.read().catch((e: unknown) => {
            throw s.why() ?? new TransportError(`the stream broke off: ${(e as Error).message}`, { cause: e });
          });
          if (next.done) break;
          buf += decoder.decode(next.value, { stream: true });
          let cut: number;
          while ((cut = buf.indexOf("\n\n")) >= 0) {
            const event = buf.slice(0, cut);
            buf = buf.slice(cut + 2);
            for (const line of event.split("\n")) {
              if (!line.startsWith("data:")) continue;
              const data = line.slice(5).trim();
              if (data === "[DONE]") continue;
              const v = JSON.parse(data) as Json;
              if (v.error) {
                const e = v.error as { message?: string; code?: string };
                throw new ApiError(e.message ?? "the generation failed", e.code ?? "generation_error");
              }
              if (v.usage) usage = v.usage as Json;
              const choice = ((v.choices ?? []) as Json[])[0];
              if (!choice) continue;
              if (choice.finish_reason) finishReason = String(choice.finish_reason);
              const ids = (choice.token_ids ?? []) as number[];
              const delta = (choice.delta ?? {}) as Json;
              const text =
                typeof choice.text === "string" ? choice.text : typeof delta.content === "string" ? delta.content : "";
              if (ids.length === 0 && text === "") continue;
              first ??= performance.now();
              generated += ids.length;
              yield { type: "token", token: text, tokenId: ids[ids.length - 1] ?? -1, tokenIds: ids };
            }
          }
        }
      } finally {
        // Stopping early (break, throw, abort) closes the connection: the server aborts the request.
        await reader.cancel().catch(() => undefined);
      }
      const end = performance.now();
      const tokens = typeof usage?.completion_tokens === "number" ? usage.completion_tokens : generated;
      const ttft = (first ?? end) - t0;
      yield {
        type: "metadata",
        stats: {
          promptTokens: typeof usage?.prompt_tokens === "number" ? usage.prompt_tokens : 0,
          tokensGenerated: tokens,
          tokensPerSecond: tokens > 1 && first !== undefined ? ((tokens - 1) * 1000) / (end - first) : 0,
          timeToFirstTokenMs: ttft,
          totalTimeMs: end - t0,
          finishReason,
        },
      };
    } finally {
      s.abort();
      s.done();
    }
  }
}

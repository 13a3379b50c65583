import { spawn, type ChildProcess } from "node:child_process";
import { createInterface } from "node:readline";
import { AbortError, ApiError, MlxServingError, TimeoutError, TransportError } from "./errors.js";
import { modelInfo } from "./http.js";
import { wireRequest } from "./request.js";
import type { GenerateOptions, GeneratorParams, LoadModelOptions, TokenizeParams } from "./schemas.js";
import type { Transport } from "./transport.js";
import type { GeneratorChunk, Health, ModelInfo, RuntimeInfo } from "./types.js";

type Json = Record<string, unknown>;

interface Pending {
  resolve: (v: Json) => void;
  reject: (e: Error) => void;
}

/** Notifications of one stream, queued until the generator reads them. */
interface StreamSink {
  push: (m: Json) => void;
  fail: (e: Error) => void;
}

/** A JSON-RPC error object as an ApiError (its HTTP status and API code, when the runtime gave them). */
function rpcError(e: Json): ApiError {
  const data = (e.data ?? {}) as Json;
  const code = typeof data.code === "string" ? data.code : `rpc_${String(e.code)}`;
  const status = typeof data.status === "number" ? data.status : undefined;
  const param = typeof data.param === "string" ? data.param : null;
  return new ApiError(String(e.message ?? "the runtime refused the call"), code, status, param);
}

/** A spawned `mlx-serving rpc`, restarted on the next call when it dies. */
class Child {
  readonly proc: ChildProcess;
  readonly pending = new Map<number, Pending>();
  readonly streams = new Map<string, StreamSink>();
  dead: Error | undefined;

  constructor(binary: string, args: string[], onExit: () => void) {
    // The runtime's log goes to our stderr: warnings and errors only, unless the caller chose a level.
    const quiet = args.some((a) => a === "--log-level" || a.startsWith("--log-level=")) ? [] : ["--log-level", "warn"];
    this.proc = spawn(binary, ["rpc", ...quiet, ...args], { stdio: ["pipe", "pipe", "inherit"] });
    const lines = createInterface({ input: this.proc.stdout! });
    lines.on("line", (line) => this.dispatch(line));
    const die = (why: string) => {
      if (this.dead) return;
      this.dead = new TransportError(why);
      for (const p of this.pending.values()) p.reject(this.dead);
      for (const s of this.streams.values()) s.fail(this.dead);
      this.pending.clear();
      this.streams.clear();
      onExit();
    };
    this.proc.on("error", (e) => die(`cannot run ${binary}: ${e.message}`));
    this.proc.on("exit", (code, signal) => die(`the runtime exited (${signal ?? `code ${code}`})`));
    this.proc.stdin!.on("error", () => undefined);
  }

  private dispatch(line: string) {
    let m: Json;
    try {
      m = JSON.parse(line) as Json;
    } catch {
      return;
    }
    if (typeof m.method === "string" && m.method.startsWith("stream.")) {
      const params = (m.params ?? {}) as Json;
      this.streams.get(String(params.stream_id))?.push(m);
      return;
    }
    if (typeof m.id === "number") {
      const p = this.pending.get(m.id);
      if (!p) return;
      this.pending.delete(m.id);
      if (m.error) p.reject(rpcError(m.error as Json));
      else p.resolve((m.result ?? {}) as Json);
    }
  }

  /** Writes one message, waiting for the pipe to drain when it is full (backpressure). */
  async write(msg: Json): Promise<void> {
    if (this.dead) throw this.dead;
    const stdin = this.proc.stdin!;
    if (!stdin.write(JSON.stringify(msg) + "\n")) {
      await new Promise<void>((resolve) => stdin.once("drain", resolve));
    }
  }
}

/** Drives `mlx-serving rpc` over its stdin/stdout. */
export class RpcTransport implements Transport {
  private child: Child | undefined;
  private nextId = 1;
  private nextStream = 1;
  private closed = false;

  constructor(
    private readonly binary: string,
    private readonly args: string[],
    private readonly defaultTimeoutMs?: number,
  ) {}

  private running(): Child {
    if (this.closed) throw new MlxServingError("the engine is shut down", "engine_closed");
    if (!this.child || this.child.dead) {
      const c: Child = new Child(this.binary, this.args, () => {
        if (this.child === c) this.child = undefined;
      });
      this.child = c;
    }
    return this.child;
  }

  /** The runtime's process id (a new one after a restart). */
  get pid(): number | undefined {
    return this.child?.proc.pid;
  }

  private async request(method: string, params: Json, timeoutMs?: number): Promise<Json> {
    const child = this.running();
    const id = this.nextId++;
    const t = timeoutMs ?? this.defaultTimeoutMs;
    return new Promise<Json>((resolve, reject) => {
      const timer =
        t === undefined
          ? undefined
          : setTimeout(() => {
              child.pending.delete(id);
              reject(new TimeoutError(`${method}: no answer within ${t} ms`));
            }, t);
      const done = (f: () => void) => {
        if (timer) clearTimeout(timer);
        f();
      };
      child.pending.set(id, { resolve: (v) => done(() => resolve(v)), reject: (e) => done(() => reject(e)) });
      child.write({ jsonrpc: "2.0", id, method, params }).catch((e: Error) => {
        child.pending.delete(id);
        done(() => reject(e));
      });
    });
  }

  async loadModel(o: LoadModelOptions, timeoutMs?: number): Promise<ModelInfo> {
    const params: Json = { model: o.model };
    if (o.localPath !== undefined) params.local_path = o.localPath;
    if (o.draft !== undefined) params.draft = o.draft;
    return modelInfo(await this.request("load_model", params, timeoutMs));
  }

  async unloadModel(id: string, timeoutMs?: number): Promise<void> {
    await this.request("unload_model", { model: id }, timeoutMs);
  }

  async listModels(timeoutMs?: number): Promise<ModelInfo[]> {
    const r = await this.request("runtime/state", {}, timeoutMs);
    return ((r.models ?? []) as Json[]).map(modelInfo);
  }

  async getModelInfo(id: string, timeoutMs?: number): Promise<ModelInfo> {
    const m = (await this.listModels(timeoutMs)).find((x) => x.id === id || x.aliases.includes(id));
    if (!m) throw new ApiError(`the model \`${id}\` does not exist`, "model_not_found", 404, "model");
    return m;
  }

  async tokenize(p: TokenizeParams, timeoutMs?: number): Promise<number[]> {
    const r = await this.request("tokenize", { model: p.model, text: p.text, add_special_tokens: p.addBos ?? true }, timeoutMs);
    return (r.tokens ?? []) as number[];
  }

  async runtimeInfo(timeoutMs?: number): Promise<RuntimeInfo> {
    const r = await this.request("runtime/info", {}, timeoutMs);
    return { mode: "stdio", endpoint: this.binary, models: ((r.models ?? []) as Json[]).map((m) => String(m.id)) };
  }

  async health(timeoutMs?: number): Promise<Health> {
    const r = await this.request("runtime/state", {}, timeoutMs);
    const h = (r.health ?? {}) as Json;
    return { status: String(h.status ?? "unknown"), running: Number(h.running ?? 0), waiting: Number(h.waiting ?? 0) };
  }

  async close(): Promise<void> {
    this.closed = true;
    const c = this.child;
    if (!c || c.dead) return;
    await new Promise<void>((resolve) => {
      c.proc.once("exit", () => resolve());
      c.proc.stdin!.end();
      setTimeout(() => c.proc.kill("SIGKILL"), 10_000).unref();
    });
  }

  async *generate(p: GeneratorParams, o: GenerateOptions): AsyncGenerator<GeneratorChunk> {
    const req = await wireRequest(p);
    const child = this.running();
    const streamId = `ts-${this.nextStream++}`;
    const queue: Json[] = [];
    let wake: (() => void) | undefined;
    let failure: Error | undefined;
    child.streams.set(streamId, {
      push: (m) => {
        queue.push(m);
        wake?.();
      },
      fail: (e) => {
        failure = e;
        wake?.();
      },
    });
    const params: Json = { ...req.body, stream_id: streamId };
    if (o.priority) params.priority = o.priority;
    const t = o.timeoutMs ?? this.defaultTimeoutMs;
    let stop: Error | undefined;
    let rejectStop: (e: Error) => void = () => undefined;
    const stopped = new Promise<never>((_, reject) => (rejectStop = reject));
    stopped.catch(() => undefined);
    const halt = (e: Error) => {
      stop ??= e;
      rejectStop(e);
      wake?.();
    };
    const timer = t === undefined ? undefined : setTimeout(() => halt(new TimeoutError(`no answer within ${t} ms`)), t);
    const onAbort = () => halt(new AbortError());
    if (o.signal?.aborted) onAbort();
    o.signal?.addEventListener("abort", onAbort, { once: true });
    let finished = false;
    try {
      await Promise.race([this.request("generate", params), stopped]);
      let stats: Json | undefined;
      for (;;) {
        if (stop) throw stop;
        if (failure) throw failure;
        const m = queue.shift();
        if (!m) {
          await new Promise<void>((resolve) => (wake = resolve));
          wake = undefined;
          continue;
        }
        const q = (m.params ?? {}) as Json;
        if (m.method === "stream.chunk") {
          const ids = (q.token_ids ?? []) as number[];
          yield { type: "token", token: String(q.token ?? ""), tokenId: ids[ids.length - 1] ?? -1, tokenIds: ids };
        } else if (m.method === "stream.stats") {
          stats = q;
        } else if (m.method === "stream.event") {
          finished = true;
          if (q.event === "error") throw rpcError((q.error ?? {}) as Json);
          if (q.event === "cancelled") throw new AbortError("the generation was cancelled");
          const s = stats ?? {};
          yield {
            type: "metadata",
            stats: {
              promptTokens: Number(s.prompt_tokens ?? 0),
              tokensGenerated: Number(s.tokens_generated ?? 0),
              tokensPerSecond: Number(s.tokens_per_second ?? 0),
              timeToFirstTokenMs: Number(s.time_to_first_token_ms ?? 0),
              totalTimeMs: Number(s.total_time_ms ?? 0),
              finishReason: q.finish_reason == null ? null : String(q.finish_reason),
            },
          };
          return;
        }
      }
    } finally {
      if (timer) clearTimeout(timer);
      o.signal?.removeEventListener("abort", onAbort);
      child.streams.delete(streamId);
      // Left early (break, abort, timeout, error): the runtime drops the generation.
      if (!finished && !child.dead) {
        await this.request("cancel", { stream_id: streamId }).catch(() => undefined);
      }
    }
  }
}

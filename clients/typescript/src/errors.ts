/** Every error this package throws is an MlxServingError; `code` is stable across versions. */
export class MlxServingError extends Error {
  readonly code: string;
  constructor(message: string, code: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
    this.code = code;
  }
}

/** An argument failed validation before anything was sent; `issues` lists each problem with its path. */
export class ValidationError extends MlxServingError {
  readonly issues: { path: string; message: string }[];
  constructor(message: string, issues: { path: string; message: string }[]) {
    super(message, "validation_error");
    this.issues = issues;
  }
}

/** The runtime or server refused the request (an OpenAI error envelope or a JSON-RPC error). */
export class ApiError extends MlxServingError {
  readonly status: number | undefined;
  readonly param: string | null;
  constructor(message: string, code: string, status?: number, param?: string | null) {
    super(message, code);
    this.status = status;
    this.param = param ?? null;
  }
}

/** The runtime or server could not be reached, or went away mid-call. */
export class TransportError extends MlxServingError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, "transport_error", options);
  }
}

/** A call ran past its `timeoutMs`. */
export class TimeoutError extends MlxServingError {
  constructor(message: string) {
    super(message, "timeout");
  }
}

/** A call was cancelled by its `AbortSignal`. */
export class AbortError extends MlxServingError {
  constructor(message = "the generation was aborted") {
    super(message, "aborted");
  }
}

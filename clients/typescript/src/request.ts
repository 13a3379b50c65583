import { readFile, stat } from "node:fs/promises";
import { ValidationError } from "./errors.js";
import type { GeneratorParams, ImageInput } from "./schemas.js";

type Json = Record<string, unknown>;

/** A generation as the runtime and the server take it: a chat (`messages`) or a completion (`prompt`). */
export interface WireRequest {
  chat: boolean;
  body: Json;
}

/** camelCase parameters and their wire names (snake_case, as the server and the runtime name them). */
const FIELDS: [keyof GeneratorParams, string][] = [
  ["maxTokens", "max_tokens"],
  ["minTokens", "min_tokens"],
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

/** Largest image file read for a request (the server has its own, usually smaller, limit). */
const MAX_IMAGE_FILE_BYTES = 64 << 20;

/**
 * The request for validated params. A text prompt with images (`multimodal`) becomes one user message (images
 * first, then the text) so the model's chat template places the image tokens; image files are read here.
 */
export async function wireRequest(p: GeneratorParams): Promise<WireRequest> {
  const body: Json = { model: p.model };
  for (const [from, to] of FIELDS) if (p[from] !== undefined) body[to] = p[from];
  if (p.structured) {
    const { schema, name } = p.structured;
    body.response_format = { type: "json_schema", json_schema: { name: name ?? "output", schema, strict: true } };
  }
  if (p.messages) {
    body.messages = p.messages;
    return { chat: true, body };
  }
  if (p.multimodal && typeof p.prompt === "string") {
    const { images, imageFormat } = p.multimodal;
    const urls = await Promise.all(
      images.map((img, i) => imageUrl(img, imageFormat, `params.multimodal.images.${i}`)),
    );
    body.messages = [{ role: "user", content: [...urls.map(imagePart), { type: "text", text: p.prompt }] }];
    return { chat: true, body };
  }
  body.prompt = typeof p.prompt === "string" ? p.prompt : p.prompt!.tokens;
  return { chat: false, body };
}

export function imagePart(url: string): Json {
  return { type: "image_url", image_url: { url } };
}

function invalid(path: string, message: string): ValidationError {
  return new ValidationError(`${path}: ${message}`, [{ path, message }]);
}

/** The MIME type of image bytes by their signature (PNG, JPEG, GIF, WebP: what the server decodes). */
function sniff(b: Uint8Array): string | undefined {
  const at = (i: number, s: string) => [...s].every((c, k) => b[i + k] === c.charCodeAt(0));
  if (b[0] === 0x89 && at(1, "PNG")) return "image/png";
  if (b[0] === 0xff && b[1] === 0xd8 && b[2] === 0xff) return "image/jpeg";
  if (at(0, "GIF8")) return "image/gif";
  if (at(0, "RIFF") && at(8, "WEBP")) return "image/webp";
  return undefined;
}

const MIME: Record<string, string> = { png: "image/png", jpg: "image/jpeg", jpeg: "image/jpeg", webp: "image/webp", gif: "image/gif" };

/** Image bytes as a `data:` URL (the type from `format`, else from the bytes). */
export function dataUrl(bytes: Uint8Array, format: string | undefined, path: string): string {
  const mime = format ? MIME[format] : sniff(bytes);
  if (!mime) throw invalid(path, "not a PNG, JPEG, WebP or GIF image");
  return `data:${mime};base64,${Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString("base64")}`;
}

async function readImage(file: string, format: string | undefined, path: string): Promise<string> {
  let size: number;
  try {
    size = (await stat(file)).size;
  } catch (e) {
    throw invalid(path, `cannot read the image file ${file}: ${(e as Error).message}`);
  }
  if (size > MAX_IMAGE_FILE_BYTES) throw invalid(path, `the image file ${file} has ${size} bytes, over ${MAX_IMAGE_FILE_BYTES}`);
  return dataUrl(await readFile(file), format, path);
}

const BASE64 = /^[A-Za-z0-9+/]+={0,2}$/;

/**
 * One image as a URL the server takes: URLs as they are, files read into `data:` URLs, bare base64 given its
 * type. `how` as the original's `imageFormat`; without it, by the string's look.
 */
export async function imageUrl(
  s: string,
  how: "base64" | "url" | "path" | undefined,
  path: string,
  format?: string,
): Promise<string> {
  const url = /^(data:|https?:\/\/|file:\/\/)/i.test(s);
  if (how === "url" || (how === undefined && url)) return s;
  const compact = s.replace(/\s+/g, "");
  const looksBase64 = compact.length >= 64 && compact.length % 4 === 0 && BASE64.test(compact);
  if (how === "base64" || (how === undefined && looksBase64 && !(await exists(s)))) {
    if (!BASE64.test(compact)) throw invalid(path, "not base64");
    return dataUrl(Buffer.from(compact, "base64"), format, path);
  }
  return readImage(s, format, path);
}

async function exists(file: string): Promise<boolean> {
  return stat(file).then(
    () => true,
    () => false,
  );
}

/** An ImageInput (`createVisionGenerator`) as a URL. */
export async function inputUrl(img: ImageInput, path: string): Promise<string> {
  if (typeof img.source === "string") return imageUrl(img.source, undefined, `${path}.source`, img.format);
  return dataUrl(img.source, img.format, `${path}.source`);
}

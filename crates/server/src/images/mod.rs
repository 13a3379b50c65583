//! Images in chat messages: OpenAI `{"type": "image_url", "image_url": {"url": ...}}` parts found, checked
//! and loaded (`data:` URLs; local files only under `image_dirs`; `http(s)` URLs only when allowed, fetched by
//! [`remote`]),
//! decoded within the byte and pixel limits, and preprocessed for the model's encoder, each failure a 400
//! naming the part (`messages[1].content[2].image_url`). Bounds are checked before the work they bound: the
//! image count before any decoding, bytes before decoding, pixels from the header before any pixel.

use crate::error::ApiError;
use base64::Engine as _;
use mlx_serving_engine::MmInput;
use mlx_serving_frontend::image::{
    decode, idefics3::Idefics3Config, qwen2vl::Qwen2VlConfig, ImageError, ImageLimits, Rgb,
};
use mlx_serving_models::{HeldBytes, ImagePixels, ImageProcessing, ModelBundle, PixelLayout};
use mlx_serving_protocol::ChatMessage;
use serde_json::Value;
use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

pub mod remote;

/// Where images may come from and how large they may be (`server:` in `runtime.yaml`).
#[derive(Clone, Debug)]
pub struct ImageOptions {
    /// Fetch `http(s)` image URLs (off: such URLs are refused).
    pub allow_remote: bool,
    /// A remote image's URL as given may name a loopback or private address (redirects still may not).
    pub allow_private_hosts: bool,
    /// All of a request's remote images must have arrived this long after the first fetch starts.
    pub remote_timeout: Duration,
    /// Directories local image files may be read from (`file://` URLs or absolute paths); none by default.
    pub dirs: Vec<PathBuf>,
    pub max_bytes: usize,
    pub max_pixels: u64,
    pub max_per_request: usize,
    /// Most bytes of preprocessed pixels held by all requests at once (queued, running or being answered);
    /// beyond, a request with images gets a 429.
    pub max_pixel_bytes_in_flight: usize,
}

impl Default for ImageOptions {
    fn default() -> Self {
        let l = ImageLimits::default();
        Self {
            allow_remote: false,
            allow_private_hosts: false,
            remote_timeout: Duration::from_secs(10),
            dirs: Vec::new(),
            max_bytes: l.max_bytes,
            max_pixels: l.max_pixels,
            max_per_request: 8,
            max_pixel_bytes_in_flight: 2 << 30,
        }
    }
}

/// One image part of a request: the field that holds it, its URL, and for a remote URL the bytes fetched.
pub(crate) struct ImagePart {
    pub field: String,
    pub url: String,
    pub fetched: Option<Vec<u8>>,
}

fn is_remote(url: &str) -> bool {
    let url = url.trim_start();
    ["http://", "https://"].iter().any(|p| url.get(..p.len()).is_some_and(|s| s.eq_ignore_ascii_case(p)))
}

/// Fetches the parts' remote images, when this server fetches them, one after another within one deadline;
/// a failure is a 400 naming the part. Without `allow_remote` nothing is fetched ([`prepare`] refuses them).
pub(crate) async fn fetch_remote(parts: &mut [ImagePart], opts: &ImageOptions) -> Result<(), ApiError> {
    if !opts.allow_remote {
        return Ok(());
    }
    let policy = remote::RemotePolicy { max_bytes: opts.max_bytes, allow_private: opts.allow_private_hosts };
    let deadline = tokio::time::Instant::now() + opts.remote_timeout;
    for p in parts.iter_mut().filter(|p| is_remote(&p.url)) {
        let bytes = remote::fetch(p.url.trim(), policy, deadline).await.map_err(|e| {
            ApiError::bad_request(format!("{}: the image could not be fetched: {e}", p.field), Some(&p.field))
        })?;
        p.fetched = Some(bytes);
    }
    Ok(())
}

/// The request's image parts in message order, after the checks that need no work: the part's shape and
/// the number of images.
pub(crate) fn find(messages: &[ChatMessage], opts: &ImageOptions) -> Result<Vec<ImagePart>, ApiError> {
    let mut parts = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let Value::Array(list) = &m.content else { continue };
        for (j, p) in list.iter().enumerate() {
            if p.get("type").and_then(Value::as_str) != Some("image_url") {
                continue;
            }
            let field = format!("messages[{i}].content[{j}].image_url");
            let url = match p.get("image_url") {
                Some(Value::Object(o)) => o.get("url").and_then(Value::as_str),
                Some(Value::String(s)) => Some(s.as_str()),
                _ => None,
            };
            let url = url.ok_or_else(|| ApiError::bad_request(format!("{field} needs a url"), Some(&field)))?;
            if m.role != "user" {
                return Err(ApiError::bad_request(format!("{field}: images go in user messages"), Some(&field)));
            }
            parts.push(ImagePart { field, url: url.to_string(), fetched: None });
        }
    }
    if parts.len() > opts.max_per_request {
        let field = parts[opts.max_per_request].field.clone();
        return Err(ApiError::bad_request(
            format!("at most {} images per request, got {}", opts.max_per_request, parts.len()),
            Some(&field),
        ));
    }
    Ok(parts)
}

/// The image file's bytes behind `part`'s URL.
fn load<'a>(part: &'a ImagePart, opts: &ImageOptions) -> Result<Cow<'a, [u8]>, ApiError> {
    let bad = |m: String| ApiError::bad_request(format!("{}: {m}", part.field), Some(&part.field));
    if let Some(b) = &part.fetched {
        return Ok(Cow::Borrowed(b));
    }
    let url = part.url.trim();
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) =
            rest.split_once(',').ok_or_else(|| bad("a data: URL needs a comma before its data".into()))?;
        if !meta.ends_with(";base64") {
            return Err(bad("only base64 data: URLs are supported".into()));
        }
        // base64 takes 4 characters per 3 bytes: refuse an oversized image before decoding it.
        if data.len() / 4 * 3 > opts.max_bytes + 3 {
            return Err(bad(format!("the image is over the limit of {} bytes", opts.max_bytes)));
        }
        let clean: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        return base64::engine::general_purpose::STANDARD
            .decode(clean.as_bytes())
            .map(Cow::Owned)
            .map_err(|e| bad(format!("the data: URL is not valid base64 ({e})")));
    }
    if is_remote(url) {
        return Err(bad(
            "remote image URLs are off on this server (server.allow_remote_images): send a data: URL".into()
        ));
    }
    let path = PathBuf::from(url.strip_prefix("file://").unwrap_or(url));
    if opts.dirs.is_empty() || !path.is_absolute() {
        return Err(bad("local image files are not allowed here (server.image_dirs): send a data: URL".into()));
    }
    // Resolved (symbolic links and `..` followed) before the check, so nothing escapes the directories.
    let real = path.canonicalize().map_err(|_| bad("no such image file".into()))?;
    if !opts.dirs.iter().filter_map(|d| d.canonicalize().ok()).any(|d| real.starts_with(d)) {
        return Err(bad("the file is outside server.image_dirs".into()));
    }
    let len = std::fs::metadata(&real).map_err(|_| bad("no such image file".into()))?.len();
    if len > opts.max_bytes as u64 {
        return Err(bad(format!("the image is {len} bytes, over the limit of {}", opts.max_bytes)));
    }
    std::fs::read(&real).map(Cow::Owned).map_err(|_| bad("the image file could not be read".into()))
}

/// The model's image preprocessing, for the frontend.
enum Processor {
    Idefics3(Idefics3Config),
    Qwen2Vl(Qwen2VlConfig),
}

fn processor(b: &ModelBundle) -> Option<Processor> {
    b.vision.as_ref().map(|(_, p)| match p {
        ImageProcessing::Idefics3(p) => Processor::Idefics3(Idefics3Config {
            longest_edge: p.longest_edge,
            tile: p.tile,
            do_image_splitting: p.do_image_splitting,
            rescale_factor: p.rescale_factor,
            image_mean: p.image_mean,
            image_std: p.image_std,
        }),
        ImageProcessing::Qwen2Vl(p) => Processor::Qwen2Vl(Qwen2VlConfig {
            min_pixels: p.min_pixels,
            max_pixels: p.max_pixels,
            patch: p.patch,
            temporal_patch: p.temporal_patch,
            merge: p.merge,
            rescale_factor: p.rescale_factor,
            image_mean: p.image_mean,
            image_std: p.image_std,
        }),
    })
}

impl Processor {
    /// The image's pixels for the encoder (nothing held yet), and the layout its placeholder ids follow
    /// ([`ModelBundle::image_prompt_ids`]).
    fn run(&self, img: &Rgb) -> Result<(ImagePixels, (usize, usize)), String> {
        let (pixels, layout, grid) = match self {
            Self::Idefics3(p) => {
                let t = p.preprocess(img);
                let n = t.num_tiles();
                (t.pixels, PixelLayout::Tiles(n), (t.rows, t.cols))
            }
            Self::Qwen2Vl(p) => {
                let t = p.preprocess(img).map_err(|e| e.to_string())?;
                let layout = PixelLayout::Patches { rows: t.grid_h, cols: t.grid_w };
                (t.pixels, layout, (t.grid_h / p.merge, t.grid_w / p.merge))
            }
        };
        Ok((ImagePixels { pixels, layout, held: None }, grid))
    }
}

/// A loaded and preprocessed image: its layout in prompt ids and its pixels.
pub(crate) struct Prepared {
    pub grid: (usize, usize),
    pub pixels: ImagePixels,
}

/// Loads, decodes and preprocesses every part (CPU work: run it on the CPU pool), each image's pixels counted
/// in `held` (all requests' images in flight) for as long as they live; over the budget: 429.
pub(crate) fn prepare(
    b: &ModelBundle,
    parts: &[ImagePart],
    opts: &ImageOptions,
    held: &Arc<AtomicUsize>,
) -> Result<Vec<Prepared>, ApiError> {
    let Some(proc) = processor(b) else {
        let field = parts.first().map_or("messages", |p| p.field.as_str());
        return Err(ApiError::bad_request("this model does not take images", Some(field)));
    };
    let limits = ImageLimits { max_bytes: opts.max_bytes, max_pixels: opts.max_pixels, ..ImageLimits::default() };
    parts
        .iter()
        .map(|part| {
            let bytes = load(part, opts)?;
            let bad = |e: String| ApiError::bad_request(format!("{}: {e}", part.field), Some(&part.field));
            let img = decode(&bytes, &limits).map_err(|e: ImageError| bad(e.to_string()))?;
            let (mut pixels, grid) = proc.run(&img).map_err(bad)?;
            let bytes = pixels.pixels.len() * 4;
            let ticket = HeldBytes::take(held, bytes, opts.max_pixel_bytes_in_flight).ok_or_else(|| {
                ApiError::overloaded(format!(
                    "too many images in flight (server.max_image_mb_in_flight, {} MB): try again later",
                    opts.max_pixel_bytes_in_flight >> 20
                ))
            })?;
            pixels.held = Some(ticket);
            Ok(Prepared { grid, pixels })
        })
        .collect()
}

/// The engine's inputs for `prepared` images at `spans` of the prompt.
pub(crate) fn mm_inputs(prepared: Vec<Prepared>, spans: Vec<std::ops::Range<usize>>) -> Vec<MmInput> {
    prepared
        .into_iter()
        .zip(spans)
        .map(|(p, span)| MmInput { span, hash: p.pixels.content_hash(), data: Arc::new(p.pixels) })
        .collect()
}

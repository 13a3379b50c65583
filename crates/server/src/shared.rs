//! Identical deterministic requests share one generation (#22): the key that says two requests would get
//! the same answer, and the plumbing between a flight of [`Piece`]s and the response writers.
//!
//! Only deterministic requests are shared: greedy, or sampled with a seed (each choice's seed is derived from
//! it, so the whole answer is fixed). Everything that can change the pieces is in the key: the model and its
//! file, the kind of endpoint, every prompt's token ids (after the chat template and tools), every sampling
//! parameter, `n`, the constraint, tool names, echo, logprobs; and the API key's identity, so that one tenant
//! never learns from another's timing. `stream` is not: streamed and whole answers are written from the same
//! pieces.

use crate::driver::Piece;
use crate::respond::Job;
use crate::AppState;
use mlx_serving_engine::SamplingParams;
use mlx_serving_services::{CacheBackend, Publisher, Subscription};
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc;

/// The sharing key of a request, or `None` when its answer is not deterministic.
pub(crate) fn key(job: &Job, params: &SamplingParams, constraint: &str, tenant: Option<u64>) -> Option<String> {
    if !(params.is_greedy() || params.seed.is_some()) {
        return None;
    }
    let m = job.model.model();
    // The file's size and modification time stand for its revision.
    let revision = std::fs::metadata(&m.bundle.path)
        .map(|meta| (meta.len(), meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())))
        .ok();
    let mut k = String::with_capacity(256);
    let _ = write!(
        k,
        "model={:?} file={:?} rev={revision:?} kind={:?} n={} logprobs={} tools={:?} constraint={constraint} tenant={tenant:?} params={}",
        m.name,
        m.bundle.path,
        job.kind,
        job.n,
        job.logprobs,
        job.tool_names,
        serde_json::to_string(params).unwrap_or_default(),
    );
    for p in &job.prompts {
        let images: Vec<u64> = p.mm.iter().map(|m| m.hash).collect();
        let _ = write!(k, " prompt={:?} echo={:?} images={images:?}", p.ids, p.echo);
    }
    Some(k)
}

/// A subscription's pieces as the channel the response writers read: a task forwards them, and ends (dropping
/// the subscription) when the writer goes away.
pub(crate) fn forward(mut sub: Subscription<Piece>) -> mpsc::Receiver<Piece> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        while let Some(p) = sub.next().await {
            if tx.send(p).await.is_err() {
                break;
            }
        }
    });
    rx
}

/// The cached answer for `key`, if any; counts the hit or miss (a backend error counts as a miss too, and is
/// logged: the request is answered by the engine).
pub(crate) async fn cached(s: &AppState, cache: &dyn CacheBackend, key: &str) -> Option<Vec<Piece>> {
    let m = &s.metrics;
    let found = match cache.get(&crate::cache::storage_key(key)).await {
        Ok(found) => found.and_then(|bytes| crate::cache::decode(key, &bytes)),
        Err(e) => {
            m.cache_errors.fetch_add(1, Ordering::Relaxed);
            // Counted; the backend logs an outage once.
            tracing::debug!(backend = cache.name(), error = %e, "response cache lookup failed; answering from the engine");
            None
        }
    };
    let counter = if found.is_some() { &m.cache_hits } else { &m.cache_misses };
    counter.fetch_add(1, Ordering::Relaxed);
    found
}

/// Where a finished answer is stored.
pub(crate) struct Store {
    pub cache: Arc<dyn CacheBackend>,
    pub key: String,
    /// Choices of the answer: it is stored only when each one finished.
    pub choices: usize,
}

/// Runs a generation's pieces to where they go: to every request sharing it (through `publisher`, this one
/// included through its subscription) or straight to this request's writer; and, when whole, into the cache.
/// When nobody reads them any more the pieces channel is dropped, and the drivers abort their engine requests.
pub(crate) fn tee(
    s: Arc<AppState>,
    mut pieces: mpsc::Receiver<Piece>,
    publisher: Option<(Publisher<Piece>, Subscription<Piece>)>,
    store: Option<Store>,
) -> mpsc::Receiver<Piece> {
    let (publisher, own, direct) = match publisher {
        Some((p, sub)) => (Some(p), Some(sub), None),
        None => {
            let (tx, rx) = mpsc::channel(64);
            (None, None, Some((tx, rx)))
        }
    };
    let (direct_tx, direct_rx) = match direct {
        Some((tx, rx)) => (Some(tx), Some(rx)),
        None => (None, None),
    };
    tokio::spawn(async move {
        let mut recorded = store.as_ref().map(|_| Vec::new());
        while let Some(p) = pieces.recv().await {
            if let Some(r) = recorded.as_mut() {
                r.push(p.clone());
            }
            let wanted = match (&publisher, &direct_tx) {
                (Some(pb), _) => pb.publish(p),
                (None, Some(tx)) => tx.send(p).await.is_ok(),
                (None, None) => false,
            };
            if !wanted {
                // Abandoned part way: not a whole answer.
                recorded = None;
                break;
            }
        }
        drop(pieces);
        if let (Some(st), Some(r)) = (store, recorded) {
            if let Some(bytes) = crate::cache::encode(&st.key, &r, st.choices) {
                if let Err(e) = st.cache.put(&crate::cache::storage_key(&st.key), bytes.into()).await {
                    s.metrics.cache_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(backend = st.cache.name(), error = %e, "storing a response failed");
                }
            }
        }
        // Only now is the flight closed: a request arriving meanwhile joined it rather than missing the cache.
        drop(publisher);
    });
    match (own, direct_rx) {
        (Some(sub), _) => forward(sub),
        (None, Some(rx)) => rx,
        (None, None) => unreachable!("either a subscription or a direct channel"),
    }
}

//! The response cache (#22): completed deterministic responses by key, in memory (LRU with a TTL and bounds
//! on entries and bytes) or on disk (the same, persisted as one file per entry written atomically: a
//! temporary file, synced, then renamed, so a crash mid-write never leaves a partial entry under a key).
//! What is stored is opaque bytes; the server decides what goes in and checks what comes out.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CacheError(pub String);

/// A store of responses by key.
pub trait CacheBackend: Send + Sync + std::fmt::Debug {
    /// The entry for `key`, if present and not expired.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Arc<[u8]>>, CacheError>>;
    /// Stores `value` under `key` (replacing any entry), evicting the least recently used entries as needed.
    fn put<'a>(&'a self, key: &'a str, value: Arc<[u8]>) -> BoxFuture<'a, Result<(), CacheError>>;
    /// `memory`, `disk` or `redis`.
    fn name(&self) -> &'static str;
    /// Counters for metrics.
    fn stats(&self) -> CacheStats;
    /// Whether the entries live in this process (so `stats` counts them); false for a shared server.
    fn is_local(&self) -> bool {
        true
    }
}

/// What a backend reports for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub entries: u64,
    pub bytes: u64,
    pub evictions: u64,
}

/// Bounds of a cache.
#[derive(Clone, Copy, Debug)]
pub struct CacheLimits {
    pub max_entries: usize,
    pub max_bytes: u64,
    pub ttl: Duration,
}

fn lock<X>(m: &Mutex<X>) -> MutexGuard<'_, X> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An LRU index of sized entries with expiry times: what both local backends keep in memory.
#[derive(Debug, Default)]
struct Lru<V> {
    entries: HashMap<String, (V, u64, Instant, u64)>,
    /// Use order: tick → key.
    order: BTreeMap<u64, String>,
    tick: u64,
    bytes: u64,
    evictions: u64,
}

impl<V: Clone> Lru<V> {
    fn get(&mut self, key: &str, now: Instant) -> Option<V> {
        let (value, size, expires, tick) = self.entries.get(key)?.clone();
        if expires <= now {
            self.remove(key);
            return None;
        }
        self.order.remove(&tick);
        self.tick += 1;
        self.order.insert(self.tick, key.to_string());
        self.entries.insert(key.to_string(), (value.clone(), size, expires, self.tick));
        Some(value)
    }

    /// Inserts, then returns the keys evicted to stay within `limits`.
    fn put(&mut self, key: &str, value: V, size: u64, expires: Instant, limits: &CacheLimits) -> Vec<String> {
        self.remove(key);
        self.tick += 1;
        self.entries.insert(key.to_string(), (value, size, expires, self.tick));
        self.order.insert(self.tick, key.to_string());
        self.bytes += size;
        let mut evicted = Vec::new();
        while self.entries.len() > limits.max_entries || self.bytes > limits.max_bytes {
            let Some((_, oldest)) = self.order.pop_first() else { break };
            if let Some((_, size, _, _)) = self.entries.remove(&oldest) {
                self.bytes -= size;
            }
            self.evictions += 1;
            evicted.push(oldest);
        }
        evicted
    }

    fn remove(&mut self, key: &str) -> bool {
        match self.entries.remove(key) {
            Some((_, size, _, tick)) => {
                self.order.remove(&tick);
                self.bytes -= size;
                true
            }
            None => false,
        }
    }

    fn stats(&self) -> CacheStats {
        CacheStats { entries: self.entries.len() as u64, bytes: self.bytes, evictions: self.evictions }
    }
}

/// Responses in this process's memory.
#[derive(Debug)]
pub struct MemoryCache {
    lru: Mutex<Lru<Arc<[u8]>>>,
    limits: CacheLimits,
}

impl MemoryCache {
    pub fn new(limits: CacheLimits) -> Self {
        Self { lru: Mutex::new(Lru::default()), limits }
    }

    pub fn get_now(&self, key: &str) -> Option<Arc<[u8]>> {
        lock(&self.lru).get(key, Instant::now())
    }

    pub fn put_now(&self, key: &str, value: Arc<[u8]>) {
        let size = value.len() as u64 + key.len() as u64;
        if size > self.limits.max_bytes {
            return;
        }
        lock(&self.lru).put(key, value, size, Instant::now() + self.limits.ttl, &self.limits);
    }
}

impl CacheBackend for MemoryCache {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Arc<[u8]>>, CacheError>> {
        Box::pin(std::future::ready(Ok(self.get_now(key))))
    }

    fn put<'a>(&'a self, key: &'a str, value: Arc<[u8]>) -> BoxFuture<'a, Result<(), CacheError>> {
        self.put_now(key, value);
        Box::pin(std::future::ready(Ok(())))
    }

    fn name(&self) -> &'static str {
        "memory"
    }

    fn stats(&self) -> CacheStats {
        lock(&self.lru).stats()
    }
}

/// Responses in a directory, one file per entry (named by a hash of the key, holding the key and the value),
/// indexed in memory; they survive a restart. Expiry is the file's modification time plus the TTL.
#[derive(Debug)]
pub struct DiskCache {
    dir: PathBuf,
    lru: Arc<Mutex<Lru<()>>>,
    limits: CacheLimits,
}

/// Entries start with this line, then the key's length (8 bytes, little-endian), the key, and the value.
const DISK_MAGIC: &[u8] = b"mlx-serving cache v1\n";

impl DiskCache {
    /// Opens (or creates) `dir`, indexing the entries there; temporary files of writes a crash interrupted are
    /// deleted, and unreadable or expired entries too.
    pub fn open(dir: &Path, limits: CacheLimits) -> Result<Self, CacheError> {
        let err = |e: std::io::Error| CacheError(format!("{}: {e}", dir.display()));
        std::fs::create_dir_all(dir).map_err(err)?;
        let mut lru = Lru::default();
        let mut found: Vec<(SystemTime, String, u64, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(err)? {
            let path = entry.map_err(err)?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            if name.ends_with(".tmp") {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if !name.ends_with(".entry") {
                continue;
            }
            match read_entry(&path) {
                Ok((key, _)) => {
                    let meta = std::fs::metadata(&path).map_err(err)?;
                    let written = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                    found.push((written, key, meta.len(), path));
                }
                Err(_) => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        // Oldest first, so the index's use order starts as the write order.
        found.sort();
        let now = (Instant::now(), SystemTime::now());
        for (written, key, size, path) in found {
            let age = now.1.duration_since(written).unwrap_or_default();
            if age >= limits.ttl {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            for evicted in lru.put(&key, (), size, now.0 + (limits.ttl - age), &limits) {
                let _ = std::fs::remove_file(dir.join(file_name(&evicted)));
            }
        }
        Ok(Self { dir: dir.to_path_buf(), lru: Arc::new(Mutex::new(lru)), limits })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(file_name(key))
    }
}

/// An entry's file name: a hash of its key (the key itself is inside, and checked on reading).
fn file_name(key: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    let a = h.finish();
    (key.len() as u64).hash(&mut h);
    format!("{a:016x}{:016x}.entry", h.finish())
}

/// Reads an entry file: its key and value. Any damage is an error.
fn read_entry(path: &Path) -> Result<(String, Vec<u8>), CacheError> {
    let bytes = std::fs::read(path).map_err(|e| CacheError(format!("{}: {e}", path.display())))?;
    let bad = || CacheError(format!("{}: not a whole cache entry", path.display()));
    let rest = bytes.strip_prefix(DISK_MAGIC).ok_or_else(bad)?;
    let (len, rest) = rest.split_at_checked(8).ok_or_else(bad)?;
    let len = u64::from_le_bytes(len.try_into().map_err(|_| bad())?) as usize;
    let (key, rest) = rest.split_at_checked(len).ok_or_else(bad)?;
    let (vlen, value) = rest.split_at_checked(8).ok_or_else(bad)?;
    if u64::from_le_bytes(vlen.try_into().map_err(|_| bad())?) as usize != value.len() {
        return Err(bad());
    }
    Ok((String::from_utf8(key.to_vec()).map_err(|_| bad())?, value.to_vec()))
}

/// Writes an entry atomically: a temporary file beside it, synced, then renamed over the entry.
fn write_entry(path: &Path, key: &str, value: &[u8]) -> std::io::Result<u64> {
    let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(DISK_MAGIC)?;
    f.write_all(&(key.len() as u64).to_le_bytes())?;
    f.write_all(key.as_bytes())?;
    f.write_all(&(value.len() as u64).to_le_bytes())?;
    f.write_all(value)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    Ok((DISK_MAGIC.len() + 16 + key.len() + value.len()) as u64)
}

impl CacheBackend for DiskCache {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Arc<[u8]>>, CacheError>> {
        Box::pin(async move {
            if lock(&self.lru).get(key, Instant::now()).is_none() {
                return Ok(None);
            }
            let path = self.path(key);
            let read = tokio::task::spawn_blocking(move || read_entry(&path))
                .await
                .map_err(|e| CacheError(format!("reading a cache entry: {e}")))?;
            match read {
                Ok((k, v)) if k == key => Ok(Some(v.into())),
                // Another key with the same hash, or a damaged file: a miss (and the index forgets it).
                _ => {
                    lock(&self.lru).remove(key);
                    Ok(None)
                }
            }
        })
    }

    fn put<'a>(&'a self, key: &'a str, value: Arc<[u8]>) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(async move {
            let path = self.path(key);
            let k = key.to_string();
            let written = tokio::task::spawn_blocking(move || write_entry(&path, &k, &value))
                .await
                .map_err(|e| CacheError(format!("writing a cache entry: {e}")))?
                .map_err(|e| CacheError(format!("writing a cache entry in {}: {e}", self.dir.display())))?;
            let evicted = lock(&self.lru).put(key, (), written, Instant::now() + self.limits.ttl, &self.limits);
            for e in evicted {
                let _ = std::fs::remove_file(self.path(&e));
            }
            Ok(())
        })
    }

    fn name(&self) -> &'static str {
        "disk"
    }

    fn stats(&self) -> CacheStats {
        lock(&self.lru).stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(entries: usize, bytes: u64, ttl_ms: u64) -> CacheLimits {
        CacheLimits { max_entries: entries, max_bytes: bytes, ttl: Duration::from_millis(ttl_ms) }
    }

    fn v(s: &str) -> Arc<[u8]> {
        s.as_bytes().into()
    }

    #[test]
    fn memory_is_lru_within_entries_bytes_and_ttl() {
        let c = MemoryCache::new(limits(2, 1000, 60_000));
        c.put_now("a", v("1"));
        c.put_now("b", v("2"));
        assert_eq!(c.get_now("a").as_deref(), Some(&b"1"[..]), "touches a");
        c.put_now("c", v("3"));
        assert!(c.get_now("b").is_none(), "b was the least recently used");
        assert_eq!(c.stats(), CacheStats { entries: 2, bytes: 4, evictions: 1 });
        let small = MemoryCache::new(limits(10, 12, 60_000));
        small.put_now("k1", v("12345"));
        small.put_now("k2", v("12345"));
        assert!(small.get_now("k1").is_none(), "bytes bound: 7 + 7 > 12");
        small.put_now("big", v(&"x".repeat(20)));
        assert!(small.get_now("big").is_none(), "an entry larger than the cache is not stored");
        let short = MemoryCache::new(limits(10, 1000, 30));
        short.put_now("t", v("1"));
        std::thread::sleep(Duration::from_millis(60));
        assert!(short.get_now("t").is_none(), "expired");
        assert_eq!(short.stats().entries, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn disk_entries_survive_a_reopen_and_damage_is_never_served() {
        let dir = std::env::temp_dir().join(format!("mlx-serving-cache-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let c = DiskCache::open(&dir, limits(3, 1 << 20, 60_000)).unwrap();
        c.put("a", v("alpha")).await.unwrap();
        c.put("b", v("beta")).await.unwrap();
        assert_eq!(c.get("a").await.unwrap().as_deref(), Some(&b"alpha"[..]));
        drop(c);
        // A crash mid-write leaves a temporary file; a torn entry file is damage.
        std::fs::write(dir.join("0000.entry.123.tmp"), b"partial").unwrap();
        let torn = dir.join(file_name("c"));
        std::fs::write(&torn, [DISK_MAGIC, &5u64.to_le_bytes()[..], b"c"].concat()).unwrap();
        let c = DiskCache::open(&dir, limits(3, 1 << 20, 60_000)).unwrap();
        assert_eq!(c.get("b").await.unwrap().as_deref(), Some(&b"beta"[..]), "survived the reopen");
        assert!(c.get("c").await.unwrap().is_none(), "the torn entry is not served");
        assert!(!torn.exists() && !dir.join("0000.entry.123.tmp").exists(), "both cleaned up");
        // LRU by entries: the fourth entry evicts the least recently used one, file and all.
        c.put("c", v("gamma")).await.unwrap();
        c.put("d", v("delta")).await.unwrap();
        assert!(c.get("a").await.unwrap().is_none(), "a was the least recently used");
        assert!(!dir.join(file_name("a")).exists());
        assert_eq!(c.stats().entries, 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

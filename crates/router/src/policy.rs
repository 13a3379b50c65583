//! Routing policies: which of the candidate instances a request goes to.
//!
//! `cache_aware` keeps, per instance, an approximate index of the prompts the router sent there: the prompt
//! text cut into blocks of `block_chars` characters, each block named by a hash chained over every block
//! before it (so a block's hash stands for the whole prefix up to it, as the instances' own prefix caches
//! key their KV blocks), remembered in a bounded LRU per instance. A prompt goes to the instance that holds
//! the most of its leading blocks when that is at least `match_threshold` of them; otherwise to the least
//! loaded; and whenever loads are uneven beyond the thresholds, to the least loaded regardless.

use crate::config::{CacheAwareConfig, PolicyName};
use crate::pool::Instance;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// What a policy may look at in a request.
#[derive(Debug, Default)]
pub struct RouteKey {
    /// The request's `user`, or the affinity header.
    pub affinity: Option<String>,
    /// The prompt as text (chat messages flattened), for `cache_aware`.
    pub text: String,
}

fn outstanding(i: &Instance) -> usize {
    i.outstanding.load(Ordering::Relaxed)
}

/// Rendezvous hashing: the candidate with the highest hash of (key, instance), weighted.
pub fn rendezvous(cands: &[Arc<Instance>], key: &str) -> usize {
    let k = xxh3_64(key.as_bytes());
    let score = |i: &Instance| {
        let h = xxh3_64_with_seed(i.url.as_bytes(), k);
        // Weighted: -w / ln(u) with u uniform in (0, 1) from the hash.
        let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        -(i.weight as f64) / u.ln()
    };
    (0..cands.len()).max_by(|&a, &b| score(&cands[a]).total_cmp(&score(&cands[b]))).unwrap_or(0)
}

/// The candidate with the fewest requests in flight at the router, then the least loaded by its own last
/// report (other clients' requests count there); remaining ties broken by a rotating start.
fn least(cands: &[Arc<Instance>], rotate: usize) -> usize {
    let n = cands.len();
    (0..n)
        .map(|k| (k + rotate) % n)
        .min_by_key(|&j| (outstanding(&cands[j]), cands[j].load.load(Ordering::Relaxed)))
        .unwrap_or(0)
}

/// Bounded LRU of block hashes: hash → tick, tick → hash.
#[derive(Debug, Default)]
struct Blocks {
    at: HashMap<u64, u64>,
    order: BTreeMap<u64, u64>,
}

impl Blocks {
    fn touch(&mut self, h: u64, tick: u64, cap: usize) {
        if let Some(old) = self.at.insert(h, tick) {
            self.order.remove(&old);
        }
        self.order.insert(tick, h);
        while self.at.len() > cap {
            let Some((_, h)) = self.order.pop_first() else { break };
            self.at.remove(&h);
        }
    }
}

/// `cache_aware`'s index: for each instance (by URL), the prefix blocks routed there.
#[derive(Debug, Default)]
pub struct PrefixIndex {
    per: HashMap<String, Blocks>,
    tick: u64,
}

/// The chained block hashes of `text`: whole blocks only (a partial last block is not yet a cacheable block).
pub fn block_hashes(text: &str, block_chars: usize) -> Vec<u64> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut out = Vec::with_capacity(chars.len() / block_chars);
    let mut prev = 0u64;
    for b in 0..chars.len() / block_chars {
        let start = chars[b * block_chars].0;
        let end = chars.get((b + 1) * block_chars).map_or(text.len(), |c| c.0);
        prev = xxh3_64_with_seed(&text.as_bytes()[start..end], prev);
        out.push(prev);
    }
    out
}

impl PrefixIndex {
    /// How many of `hashes`' leading blocks the instance at `url` holds.
    fn matched(&self, url: &str, hashes: &[u64]) -> usize {
        self.per.get(url).map_or(0, |b| hashes.iter().take_while(|h| b.at.contains_key(h)).count())
    }

    /// Remembers `hashes` on `url`, the leading blocks as the most recent (they are shared by more prompts, so
    /// they outlive the tails).
    fn insert(&mut self, url: &str, hashes: &[u64], cap: usize) {
        let b = self.per.entry(url.to_string()).or_default();
        for &h in hashes.iter().rev() {
            self.tick += 1;
            b.touch(h, self.tick, cap);
        }
    }

    /// Forgets instances no longer in the pool.
    pub fn retain(&mut self, urls: &[String]) {
        self.per.retain(|u, _| urls.contains(u));
    }

    pub fn blocks(&self, url: &str) -> usize {
        self.per.get(url).map_or(0, |b| b.at.len())
    }
}

/// Why a policy chose what it chose (for logs and metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Policy,
    /// `cache_aware`: the instance held enough of the prefix.
    CacheHit,
    /// `cache_aware`: too little of the prefix anywhere: least loaded.
    CacheMiss,
    /// `cache_aware`: loads uneven: least loaded.
    Balance,
}

/// The state every policy keeps.
#[derive(Debug, Default)]
pub struct Policies {
    rr: AtomicUsize,
    /// Smooth weighted round robin's current weights, by URL.
    swrr: Mutex<HashMap<String, i64>>,
    pub index: Mutex<PrefixIndex>,
}

impl Policies {
    /// Forgets the state of instances no longer in the pool (prefix blocks, weighted turns).
    pub fn retain(&self, urls: &[String]) {
        self.index.lock().unwrap().retain(urls);
        self.swrr.lock().unwrap().retain(|u, _| urls.contains(u));
    }

    /// The candidate `policy` picks for `key` (`cands` is not empty).
    pub fn pick(
        &self,
        policy: PolicyName,
        cands: &[Arc<Instance>],
        key: &RouteKey,
        ca: &CacheAwareConfig,
    ) -> (usize, Reason) {
        debug_assert!(!cands.is_empty());
        let rotate = self.rr.fetch_add(1, Ordering::Relaxed);
        let pick = match policy {
            PolicyName::RoundRobin => rotate % cands.len(),
            PolicyName::LeastOutstanding => least(cands, rotate),
            PolicyName::Weighted => self.weighted(cands),
            PolicyName::ConsistentHash => match &key.affinity {
                Some(a) => rendezvous(cands, a),
                None => least(cands, rotate),
            },
            PolicyName::CacheAware => return self.cache_aware(cands, key, ca, rotate),
        };
        (pick, Reason::Policy)
    }

    fn weighted(&self, cands: &[Arc<Instance>]) -> usize {
        let mut cur = self.swrr.lock().unwrap();
        let total: i64 = cands.iter().map(|i| i.weight as i64).sum();
        let mut best = 0;
        let mut best_w = i64::MIN;
        for (j, i) in cands.iter().enumerate() {
            let w = cur.entry(i.url.clone()).or_insert(0);
            *w += i.weight as i64;
            if *w > best_w {
                best_w = *w;
                best = j;
            }
        }
        *cur.get_mut(&cands[best].url).unwrap() -= total;
        best
    }

    fn cache_aware(
        &self,
        cands: &[Arc<Instance>],
        key: &RouteKey,
        ca: &CacheAwareConfig,
        rotate: usize,
    ) -> (usize, Reason) {
        let hashes = block_hashes(&key.text, ca.block_chars);
        let loads: Vec<usize> = cands.iter().map(|i| outstanding(i)).collect();
        let (lo, hi) = (*loads.iter().min().unwrap(), *loads.iter().max().unwrap());
        let uneven = hi - lo > ca.balance_abs_threshold && hi as f64 > lo as f64 * ca.balance_rel_threshold;
        let mut index = self.index.lock().unwrap();
        let (pick, reason) = if uneven {
            (least(cands, rotate), Reason::Balance)
        } else {
            // Most blocks matched; ties to the less loaded.
            let matched: Vec<usize> = cands.iter().map(|i| index.matched(&i.url, &hashes)).collect();
            let best = (0..cands.len()).max_by_key(|&j| (matched[j], std::cmp::Reverse(loads[j]))).unwrap();
            let enough = !hashes.is_empty() && matched[best] as f64 >= ca.match_threshold * hashes.len() as f64;
            match enough {
                true => (best, Reason::CacheHit),
                false => (least(cands, rotate), Reason::CacheMiss),
            }
        };
        index.insert(&cands[pick].url, &hashes, ca.max_blocks_per_instance);
        (pick, reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::Source;

    fn pool(n: usize) -> Vec<Arc<Instance>> {
        (0..n).map(|k| Instance::new(&format!("http://i{k}"), 1, Source::Static)).collect()
    }

    #[test]
    fn round_robin_and_least_outstanding() {
        let p = Policies::default();
        let c = pool(3);
        let ca = CacheAwareConfig::default();
        let key = RouteKey::default();
        let picks: Vec<usize> = (0..6).map(|_| p.pick(PolicyName::RoundRobin, &c, &key, &ca).0).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        let _a = c[0].start();
        let _b = c[2].start();
        let _b2 = c[2].start();
        for _ in 0..4 {
            assert_eq!(p.pick(PolicyName::LeastOutstanding, &c, &key, &ca).0, 1);
        }
        let _c = c[1].start();
        let _c2 = c[1].start();
        assert_eq!(p.pick(PolicyName::LeastOutstanding, &c, &key, &ca).0, 0);
        // Equal at the router: the instance's own reported load decides.
        drop((_a, _b, _b2, _c, _c2));
        c[0].load.store(5, Ordering::Relaxed);
        c[2].load.store(1, Ordering::Relaxed);
        c[1].load.store(3, Ordering::Relaxed);
        for _ in 0..3 {
            assert_eq!(p.pick(PolicyName::LeastOutstanding, &c, &key, &ca).0, 2);
        }
    }

    #[test]
    fn weighted_follows_weights_smoothly() {
        let p = Policies::default();
        let c = vec![
            Instance::new("http://a", 5, Source::Static),
            Instance::new("http://b", 1, Source::Static),
            Instance::new("http://c", 1, Source::Static),
        ];
        let ca = CacheAwareConfig::default();
        let picks: Vec<usize> =
            (0..70).map(|_| p.pick(PolicyName::Weighted, &c, &RouteKey::default(), &ca).0).collect();
        let count = |k| picks.iter().filter(|&&x| x == k).count();
        assert_eq!((count(0), count(1), count(2)), (50, 10, 10));
        // Smooth: never more than five of `a` in a row with weights 5, 1, 1.
        assert!(picks.windows(6).all(|w| w.iter().any(|&x| x != 0)));
    }

    #[test]
    fn consistent_hash_keeps_users_and_moves_few() {
        let p = Policies::default();
        let c = pool(4);
        let ca = CacheAwareConfig::default();
        let key = |u: usize| RouteKey { affinity: Some(format!("user-{u}")), text: String::new() };
        let first: Vec<usize> = (0..200).map(|u| p.pick(PolicyName::ConsistentHash, &c, &key(u), &ca).0).collect();
        for (u, &home) in first.iter().enumerate() {
            assert_eq!(p.pick(PolicyName::ConsistentHash, &c, &key(u), &ca).0, home, "user {u} stays");
        }
        let per: Vec<usize> = (0..4).map(|k| first.iter().filter(|&&x| x == k).count()).collect();
        assert!(per.iter().all(|&n| n > 25), "spread over all instances: {per:?}");
        // Instance 3 leaves: only its users move.
        let rest = &c[..3];
        for (u, &home) in first.iter().enumerate() {
            let now = p.pick(PolicyName::ConsistentHash, rest, &key(u), &ca).0;
            if home != 3 {
                assert_eq!(now, home, "user {u} was not on the leaving instance");
            }
        }
    }

    #[test]
    fn block_hashes_chain_over_whole_blocks() {
        let a = block_hashes("abcdefgh", 4);
        let b = block_hashes("abcdefghij", 4);
        let c = block_hashes("xbcdefgh", 4);
        assert_eq!(a.len(), 2);
        assert_eq!(a, b, "a partial last block adds nothing");
        assert_ne!(a[1], c[1], "a block's hash depends on everything before it");
        assert_eq!(block_hashes("ééééé", 2).len(), 2, "characters, not bytes");
        assert!(block_hashes("abc", 4).is_empty());
    }

    #[test]
    fn cache_aware_follows_prefixes_and_balances() {
        let p = Policies::default();
        let c = pool(3);
        let ca = CacheAwareConfig { block_chars: 8, balance_abs_threshold: 2, ..Default::default() };
        let doc = |d: usize| format!("{}{}", format!("document {d} ").repeat(40), "question?");
        let key = |d: usize, q: &str| RouteKey { affinity: None, text: format!("{}{q}", doc(d)) };
        let home: Vec<usize> = (0..3).map(|d| p.pick(PolicyName::CacheAware, &c, &key(d, ""), &ca).0).collect();
        let mut sorted = home.clone();
        sorted.sort();
        assert_eq!(sorted, [0, 1, 2], "new prefixes spread to the least loaded");
        for (d, &h) in home.iter().enumerate() {
            for q in ["what?", "why is that so?", "and then what happened next?"] {
                let (pick, why) = p.pick(PolicyName::CacheAware, &c, &key(d, q), &ca);
                assert_eq!((pick, why), (h, Reason::CacheHit), "document {d} goes home");
            }
        }
        // Home of document 0 busy beyond the thresholds: balance wins.
        let _busy: Vec<_> = (0..5).map(|_| c[home[0]].start()).collect();
        let (pick, why) = p.pick(PolicyName::CacheAware, &c, &key(0, "again"), &ca);
        assert_eq!(why, Reason::Balance);
        assert_ne!(pick, home[0]);
        assert!(p.index.lock().unwrap().blocks(&c[pick].url) > 0);
    }

    #[test]
    fn prefix_index_is_bounded() {
        let mut ix = PrefixIndex::default();
        let h: Vec<u64> = (0..100).collect();
        ix.insert("a", &h, 10);
        assert_eq!(ix.blocks("a"), 10);
        assert_eq!(ix.matched("a", &h), 10, "the tails went first, the leading blocks stay");
        assert_eq!(ix.matched("a", &h[10..]), 0);
        ix.retain(&[]);
        assert_eq!(ix.blocks("a"), 0);
    }
}

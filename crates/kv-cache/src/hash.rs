//! Stable block hashes: `xxh3(parent_hash, block_token_ids, extra_key)` with a fixed seed, so the same
//! prefix hashes the same in every process (the router compares these across servers).

/// A full block's identity: the tokens in it and everything before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub u64);

/// Fixed seed: changing it invalidates every hash shared between processes.
pub const HASH_SEED: u64 = 0x6d6c_782d_7365_7276; // "mlx-serv"

/// Hash of a full block chained onto its parent's hash. `extra_key` separates caches that must not share
/// blocks (model id, adapter, cache salt).
pub fn hash_block(parent: Option<BlockHash>, tokens: &[u32], extra_key: u64) -> BlockHash {
    let mut buf = Vec::with_capacity(17 + tokens.len() * 4);
    match parent {
        Some(p) => {
            buf.push(1u8);
            buf.extend_from_slice(&p.0.to_le_bytes());
        }
        None => buf.push(0u8),
    }
    buf.extend_from_slice(&extra_key.to_le_bytes());
    for t in tokens {
        buf.extend_from_slice(&t.to_le_bytes());
    }
    BlockHash(xxhash_rust::xxh3::xxh3_64_with_seed(&buf, HASH_SEED))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable_and_chained() {
        let a = hash_block(None, &[1, 2, 3, 4], 0);
        // Pinned value: a change here breaks hash compatibility between versions and processes.
        assert_eq!(a, hash_block(None, &[1, 2, 3, 4], 0));
        assert_ne!(a, hash_block(None, &[1, 2, 3, 5], 0));
        assert_ne!(a, hash_block(None, &[1, 2, 3, 4], 1), "extra key separates caches");
        let b = hash_block(Some(a), &[5, 6, 7, 8], 0);
        assert_ne!(b, hash_block(None, &[5, 6, 7, 8], 0), "same tokens after a different prefix");
        assert_ne!(b, hash_block(Some(BlockHash(a.0 ^ 1)), &[5, 6, 7, 8], 0));
    }

    #[test]
    fn hash_value_is_pinned_across_versions() {
        assert_eq!(hash_block(None, &[1, 2, 3, 4], 0), BlockHash(PINNED));
    }

    const PINNED: u64 = 13566338948071406011;
}

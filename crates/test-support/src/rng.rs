//! A small deterministic generator for tests (xorshift64): the same seed gives the same values everywhere.

pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Logits shaped like a language model's, the same on every run: a long tail around -4 and one token in 997
/// between 6 and 12 (the samplers' benchmarks).
pub fn lm_logits(vocab: usize) -> Vec<f32> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    (0..vocab)
        .map(|_| {
            let state = rng.next_u64();
            let u = (state >> 11) as f32 / (1u64 << 53) as f32;
            if state.is_multiple_of(997) {
                6.0 + 6.0 * u
            } else {
                -4.0 + 4.0 * (u - 0.5)
            }
        })
        .collect()
}

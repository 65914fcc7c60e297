//! Choosing the next token from a row of logits: greedy, or sampling with temperature,
//! top-k and top-p from a seeded generator, so a run is reproducible.

/// SplitMix64: tiny, and its stream never changes between versions.
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    pub fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Clone, Debug)]
pub enum Sampler {
    Greedy,
    /// Softmax at `temperature`, restricted to the `top_k` most likely tokens (0: all)
    /// and then to the smallest set whose probability reaches `top_p` (1.0: all).
    Sample {
        temperature: f32,
        top_k: usize,
        top_p: f32,
        rng: SplitMix64,
    },
}

impl Sampler {
    pub fn sample(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> Sampler {
        Sampler::Sample { temperature, top_k, top_p, rng: SplitMix64(seed) }
    }

    pub fn next(&mut self, logits: &[f32]) -> usize {
        match self {
            Sampler::Greedy => argmax(logits),
            Sampler::Sample { temperature, .. } if *temperature <= 0.0 => argmax(logits),
            Sampler::Sample { temperature, top_k, top_p, rng } => {
                let mut idx: Vec<usize> = (0..logits.len()).collect();
                idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
                if *top_k > 0 {
                    idx.truncate(*top_k);
                }
                let max = logits[idx[0]] as f64;
                let mut p: Vec<f64> =
                    idx.iter().map(|&i| ((logits[i] as f64 - max) / *temperature as f64).exp()).collect();
                let sum: f64 = p.iter().sum();
                p.iter_mut().for_each(|x| *x /= sum);
                let mut keep = p.len();
                let mut acc = 0.0;
                for (j, &x) in p.iter().enumerate() {
                    acc += x;
                    if acc >= *top_p as f64 {
                        keep = j + 1;
                        break;
                    }
                }
                let total: f64 = p[..keep].iter().sum();
                let mut u = rng.unit() * total;
                for j in 0..keep {
                    u -= p[j];
                    if u <= 0.0 {
                        return idx[j];
                    }
                }
                idx[keep - 1]
            }
        }
    }
}

/// The index of the largest value (the first on ties).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_one_is_greedy_and_sampling_is_seeded() {
        let logits = [0.1, 2.0, 1.9, -1.0];
        let mut s = Sampler::sample(1.0, 1, 1.0, 42);
        assert!((0..20).all(|_| s.next(&logits) == 1));
        let draw = |seed| {
            let mut s = Sampler::sample(1.0, 0, 0.9, seed);
            (0..32).map(|_| s.next(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert!(draw(7).iter().all(|&t| t != 3), "top-p 0.9 excludes the least likely token");
    }
}

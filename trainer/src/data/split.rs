//! The split of METHOD section 1: per-dimension preferences, agree / conflict / tied pairs, the
//! train / eval split by prompt hash, and the agree subset of stage 3.
//!
//! Everything random here is drawn from a ChaCha stream whose key is a SHA-256 of a purpose
//! string, the run's seed and the epoch, so results are the same on every platform and do not
//! depend on the order in which other parts of the program draw numbers.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

/// Which response one dimension prefers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Preference {
    /// `d_i > 0`.
    A,
    /// `d_i < 0`.
    B,
    /// `d_i = 0`: masked out of this dimension's loss and metrics.
    None,
}

impl Preference {
    /// +1 (A), -1 (B) or 0 (none): the factor that orients `u(y_a) - u(y_b)` towards the
    /// preferred response, and the mask of the dimension's loss.
    pub fn sign(self) -> i8 {
        match self {
            Preference::A => 1,
            Preference::B => -1,
            Preference::None => 0,
        }
    }
}

/// Whether the dimensions of a pair agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PairKind {
    /// Every non-zero component of `d = s_a - s_b` has the same sign.
    Agree,
    /// At least one positive and one negative component.
    Conflict,
}

/// The preference of every dimension: the sign of `d_i = s_a,i - s_b,i`.
pub fn preferences(scores_a: &[f64], scores_b: &[f64]) -> Vec<Preference> {
    scores_a
        .iter()
        .zip(scores_b)
        .map(|(a, b)| {
            if a > b {
                Preference::A
            } else if a < b {
                Preference::B
            } else {
                Preference::None
            }
        })
        .collect()
}

/// Agree or conflict; `None` for a fully tied pair (`d = 0`), which states no preference and
/// is dropped.
pub fn classify(preferences: &[Preference]) -> Option<PairKind> {
    let any_a = preferences.contains(&Preference::A);
    let any_b = preferences.contains(&Preference::B);
    match (any_a, any_b) {
        (true, true) => Some(PairKind::Conflict),
        (false, false) => None,
        _ => Some(PairKind::Agree),
    }
}

/// How one dimension splits the pairs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DimensionCounts {
    pub prefers_a: usize,
    pub prefers_b: usize,
    pub ties: usize,
}

/// Counts over a set of pairs: the kinds, and (over agree and conflict pairs only, the ones
/// that train) the per-dimension preferences and the conflicts of every pair of dimensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferenceCounts {
    pub pairs: usize,
    pub agree: usize,
    pub conflict: usize,
    pub tied: usize,
    pub per_dimension: Vec<DimensionCounts>,
    /// `conflicts[i][j]` (i < j): pairs where dimensions i and j prefer different responses.
    pub conflicts: Vec<Vec<usize>>,
}

impl PreferenceCounts {
    pub fn new(dimensions: usize) -> Self {
        PreferenceCounts {
            pairs: 0,
            agree: 0,
            conflict: 0,
            tied: 0,
            per_dimension: vec![DimensionCounts::default(); dimensions],
            conflicts: vec![vec![0; dimensions]; dimensions],
        }
    }

    /// Counts one pair given its per-dimension preferences.
    pub fn add(&mut self, preferences: &[Preference]) {
        self.pairs += 1;
        match classify(preferences) {
            None => {
                self.tied += 1;
                return;
            }
            Some(PairKind::Agree) => self.agree += 1,
            Some(PairKind::Conflict) => self.conflict += 1,
        }
        for (i, p) in preferences.iter().enumerate() {
            let counts = &mut self.per_dimension[i];
            match p {
                Preference::A => counts.prefers_a += 1,
                Preference::B => counts.prefers_b += 1,
                Preference::None => counts.ties += 1,
            }
            for (j, q) in preferences.iter().enumerate().skip(i + 1) {
                if p.sign() * q.sign() < 0 {
                    self.conflicts[i][j] += 1;
                }
            }
        }
    }

    /// Counts every pair of `(scores_a, scores_b)`.
    pub fn of<'a>(
        dimensions: usize,
        scores: impl IntoIterator<Item = (&'a [f64], &'a [f64])>,
    ) -> Self {
        let mut counts = PreferenceCounts::new(dimensions);
        for (a, b) in scores {
            counts.add(&preferences(a, b));
        }
        counts
    }
}

/// A 64-bit key of the prompt text: the first 8 bytes of its SHA-256, big-endian. Stable
/// across runs, platforms and Rust versions (unlike `DefaultHasher`).
pub fn prompt_key(prompt: &str) -> u64 {
    let digest = Sha256::digest(prompt.as_bytes());
    u64::from_be_bytes(digest[..8].try_into().expect("sha256 has 32 bytes"))
}

/// Whether a prompt belongs to the held-out share `fraction`: its key, read as a fraction of
/// 2^64, is below `fraction`. Every pair of a prompt lands on the same side.
pub fn is_held_out(prompt: &str, fraction: f64) -> bool {
    // 2^64 as f64 is exact; the product rounds to a nearby integer, which only moves the
    // boundary by less than one key in 2^52.
    (prompt_key(prompt) as f64) < fraction * 18_446_744_073_709_551_616.0
}

/// A random stream for one `purpose`, determined by (purpose, seed, epoch) alone.
pub fn seeded_rng(purpose: &str, seed: u64, epoch: u64) -> ChaCha8Rng {
    let mut hasher = Sha256::new();
    hasher.update(b"modpo/");
    hasher.update(purpose.as_bytes());
    hasher.update(seed.to_le_bytes());
    hasher.update(epoch.to_le_bytes());
    ChaCha8Rng::from_seed(hasher.finalize().into())
}

/// `D_agree,sub`: `n` of the `agree` pair indices, uniformly without replacement, drawn with
/// the run's seed, returned in ascending order. All of them when there are `n` or fewer (the
/// caller reports the shortfall).
pub fn agree_subset(agree: &[usize], n: usize, seed: u64) -> Vec<usize> {
    if n >= agree.len() {
        return agree.to_vec();
    }
    let mut rng = seeded_rng("agree-subset", seed, 0);
    let mut chosen: Vec<usize> = rand::seq::index::sample(&mut rng, agree.len(), n)
        .into_iter()
        .map(|i| agree[i])
        .collect();
    chosen.sort_unstable();
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_the_signs_of_d() {
        let kind = |a: &[f64], b: &[f64]| classify(&preferences(a, b));
        assert_eq!(kind(&[1.0, 2.0], &[0.0, 2.0]), Some(PairKind::Agree));
        assert_eq!(kind(&[0.0, 0.0], &[1.0, 2.0]), Some(PairKind::Agree));
        assert_eq!(
            kind(&[1.0, 0.0, 3.0], &[0.0, 1.0, 3.0]),
            Some(PairKind::Conflict)
        );
        assert_eq!(kind(&[2.0, 2.0], &[2.0, 2.0]), None);
    }

    #[test]
    fn counts_mask_ties_and_count_dimension_conflicts() {
        let pairs: [(&[f64], &[f64]); 4] = [
            (&[1.0, 0.0, 2.0], &[0.0, 1.0, 2.0]), // A, B, tie: conflict (0, 1)
            (&[1.0, 1.0, 0.0], &[0.0, 0.0, 1.0]), // A, A, B: conflicts (0, 2), (1, 2)
            (&[3.0, 3.0, 3.0], &[3.0, 3.0, 3.0]), // tied
            (&[0.0, 0.0, 0.0], &[1.0, 0.0, 0.0]), // B, tie, tie: agree
        ];
        let counts = PreferenceCounts::of(3, pairs.iter().map(|(a, b)| (*a, *b)));
        assert_eq!(
            (counts.pairs, counts.agree, counts.conflict, counts.tied),
            (4, 1, 2, 1)
        );
        assert_eq!(
            counts.per_dimension[0],
            DimensionCounts {
                prefers_a: 2,
                prefers_b: 1,
                ties: 0
            }
        );
        assert_eq!(
            counts.per_dimension[2],
            DimensionCounts {
                prefers_a: 0,
                prefers_b: 1,
                ties: 2
            }
        );
        assert_eq!(counts.conflicts[0][1], 1);
        assert_eq!(counts.conflicts[0][2], 1);
        assert_eq!(counts.conflicts[1][2], 1);
    }

    /// The key is SHA-256, checked against `hashlib`:
    /// `python3 -c "import hashlib; print(hashlib.sha256(b'hello').hexdigest()[:16])"`
    /// prints `2cf24dba5fb0a30e`.
    #[test]
    fn prompt_key_is_sha256_prefix() {
        assert_eq!(prompt_key("hello"), 0x2cf2_4dba_5fb0_a30e);
        assert!(!is_held_out("hello", 0.17)); // 0x2cf2.. / 2^64 = 0.1756
        assert!(is_held_out("hello", 0.18));
        assert!(!is_held_out("hello", 0.0));
    }

    #[test]
    fn agree_subset_is_seeded_uniform_without_replacement() {
        let agree: Vec<usize> = (0..1000).map(|i| i * 3).collect();
        let a = agree_subset(&agree, 100, 7);
        assert_eq!(a, agree_subset(&agree, 100, 7));
        assert_ne!(a, agree_subset(&agree, 100, 8));
        assert_eq!(a.len(), 100);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert!(a.iter().all(|i| i % 3 == 0 && *i < 3000));
        assert_eq!(agree_subset(&agree[..50], 100, 7), agree[..50].to_vec());
        // Uniform: over many seeds every index is drawn about n / len of the time.
        let mut hits = vec![0usize; 20];
        for seed in 0..2000 {
            for i in agree_subset(&(0..20).collect::<Vec<_>>(), 5, seed) {
                hits[i] += 1;
            }
        }
        assert!(hits.iter().all(|&h| (400..600).contains(&h)), "{hits:?}");
    }
}

//! `independent`: the first synthetic generator, kept unchanged so its published figures stay
//! reproducible (same seed, same files).
//!
//! A response is [`WORDS_PER_RESPONSE`] words. Dimension `i` owns one marker word
//! ([`MARKERS`]); its score is how often that word appears (0 to [`MAX_COUNT`]); the other words
//! are fillers no dimension rewards. A marker replaces a filler, so length carries no signal.
//! The dimensions are independent: every word counts for one dimension only, so the reward of
//! any `w` is exactly linear in separate features.
//!
//! Dimension 0 decides every pair: in an agree pair the better response has strictly more of
//! its marker and at least as many of every other; in a conflict pair the response with more
//! of dimension 0's marker has strictly fewer of another dimension `j`'s (j uniform in 1..k),
//! the remaining dimensions drawn independently.

use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::{count, FILLERS};

/// Dimension names, in order; a run with k dimensions uses the first k.
pub const DIMENSIONS: [&str; 4] = ["polite", "formal", "cheerful", "precise"];
/// The word dimension i rewards (its score is how often the word appears).
pub const MARKERS: [&str; 4] = ["please", "indeed", "great", "exactly"];
/// Words in every response.
pub const WORDS_PER_RESPONSE: usize = 8;
/// Most occurrences of one marker in a response.
pub const MAX_COUNT: usize = 3;

/// The score of every dimension of `text`: how often its marker appears.
pub fn score(text: &str, k: usize) -> Vec<f64> {
    MARKERS[..k].iter().map(|m| count(text, m) as f64).collect()
}

/// Marker counts of the better (by dimension 0) and the worse response.
fn draw_counts(rng: &mut ChaCha8Rng, k: usize, conflict: bool) -> (Vec<usize>, Vec<usize>) {
    let mut hi = vec![0; k];
    let mut lo = vec![0; k];
    // Dimension 0: strictly more in `hi`, in both kinds.
    lo[0] = rng.random_range(0..MAX_COUNT);
    hi[0] = rng.random_range(lo[0] + 1..=MAX_COUNT);
    let against = conflict.then(|| rng.random_range(1..k));
    for i in 1..k {
        if Some(i) == against {
            // Strictly fewer in `hi`: the conflict.
            hi[i] = rng.random_range(0..MAX_COUNT);
            lo[i] = rng.random_range(hi[i] + 1..=MAX_COUNT);
        } else if conflict {
            hi[i] = rng.random_range(0..=MAX_COUNT);
            lo[i] = rng.random_range(0..=MAX_COUNT);
        } else {
            // Agree: at least as many in `hi`.
            lo[i] = rng.random_range(0..=MAX_COUNT);
            hi[i] = rng.random_range(lo[i]..=MAX_COUNT);
        }
    }
    (hi, lo)
}

/// A response with the given marker counts, filled up with fillers, in random order.
fn render(rng: &mut ChaCha8Rng, counts: &[usize]) -> String {
    let mut words: Vec<&str> = Vec::with_capacity(WORDS_PER_RESPONSE);
    for (i, &c) in counts.iter().enumerate() {
        words.extend(std::iter::repeat_n(MARKERS[i], c));
    }
    debug_assert!(words.len() <= WORDS_PER_RESPONSE);
    while words.len() < WORDS_PER_RESPONSE {
        words.push(FILLERS[rng.random_range(0..FILLERS.len())]);
    }
    words.shuffle(rng);
    words.join(" ")
}

/// The better (by dimension 0) and the worse response of one pair of the given kind.
pub fn draw_pair(rng: &mut ChaCha8Rng, k: usize, conflict: bool) -> (String, String) {
    // Redraw until both responses fit in WORDS_PER_RESPONSE words (k >= 3 can exceed it).
    let (hi, lo) = loop {
        let (hi, lo) = draw_counts(rng, k, conflict);
        let fits = |c: &[usize]| c.iter().sum::<usize>() <= WORDS_PER_RESPONSE;
        if fits(&hi) && fits(&lo) {
            break (hi, lo);
        }
    };
    let better = render(rng, &hi);
    let worse = render(rng, &lo);
    (better, worse)
}

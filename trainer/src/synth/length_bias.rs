//! `length-bias`: one dimension correlates with response length (as HelpSteer's verbosity and
//! complexity do), the others do not.
//!
//! Dimension 0 ("detailed") scores the number of elaboration words ([`DETAIL`], any of three)
//! and each of them is added to the response, so a more detailed response is longer. The
//! other dimensions ("polite", "formal", "cheerful", "precise") each score one marker
//! ([`MARKERS`]) that replaces a filler, so they leave the length alone.
//!
//! A response has a base of [`BASE_WORDS`] words (uniform), holding the markers (each 0 to
//! [`MAX_MARKER`], uniform; the base always has room for all of them, so their counts are
//! independent of the length) and fillers, plus 0 to [`MAX_DETAIL`] detail words (uniform):
//! 8 to 13 words. The two responses of a pair are
//! drawn independently and the pair is redrawn until its kind (agree or conflict) is the one
//! asked for; pairs that tie on every dimension are never kept. (With k >= 3, keeping agree
//! pairs favours responses that hold more of everything, so the markers too correlate a
//! little with length in the kept pairs: about 0.2 at k = 5, against about 0.9 for the
//! detail count.)

use std::ops::RangeInclusive;

use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::{count, draw_independent_pair, FILLERS};

pub const DIMENSIONS: [&str; 5] = ["detailed", "polite", "formal", "cheerful", "precise"];
/// Dimension 0's words; each adds a word to the response.
pub const DETAIL: [&str; 3] = ["also", "besides", "further"];
/// The marker of dimension 1, 2, 3, 4; each replaces a filler.
pub const MARKERS: [&str; 4] = ["please", "indeed", "great", "exactly"];
/// The base holds up to 4 x MAX_MARKER markers (k = 5).
pub const BASE_WORDS: RangeInclusive<usize> = 8..=9;
pub const MAX_DETAIL: usize = 4;
pub const MAX_MARKER: usize = 2;

pub fn score(text: &str, k: usize) -> Vec<f64> {
    let detailed = DETAIL.iter().map(|w| count(text, w)).sum::<usize>() as f64;
    let markers = MARKERS[..k - 1].iter().map(|m| count(text, m) as f64);
    std::iter::once(detailed).chain(markers).collect()
}

fn draw_response(rng: &mut ChaCha8Rng, k: usize) -> String {
    let base = rng.random_range(BASE_WORDS);
    let mut words: Vec<&str> = Vec::with_capacity(base + MAX_DETAIL);
    for marker in &MARKERS[..k - 1] {
        words.extend(std::iter::repeat_n(
            *marker,
            rng.random_range(0..=MAX_MARKER),
        ));
    }
    while words.len() < base {
        words.push(FILLERS[rng.random_range(0..FILLERS.len())]);
    }
    for _ in 0..rng.random_range(0..=MAX_DETAIL) {
        words.push(DETAIL[rng.random_range(0..DETAIL.len())]);
    }
    words.shuffle(rng);
    words.join(" ")
}

/// Two independent responses whose pair has the kind asked for.
pub fn draw_pair(rng: &mut ChaCha8Rng, k: usize, conflict: bool) -> (String, String) {
    draw_independent_pair(rng, k, conflict, draw_response, score)
}

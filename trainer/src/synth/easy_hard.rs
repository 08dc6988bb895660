//! `easy-hard`: the structure the paper reports for PKU-SafeRLHF (METHOD.md section 6): one
//! easy dimension that a salient feature decides and that alone separates most agree pairs,
//! graded dimensions that are harder to learn, and a minority of conflict pairs (the PKU
//! sample has 117 of 500; the default rate is 20%).
//!
//! - Dimension 0 ("harmless") is easy: its score is 0 if the response contains the word
//!   [`SALIENT`] and 1 otherwise. In every pair exactly one response contains it.
//! - Dimensions 1.. ("helpful", "correct", "coherent", "complex") are graded: each owns a
//!   group of three words ([`GROUPS`]) and its score is how many words of its group the
//!   response holds (0 to [`MAX_GRADED`], each occurrence a word of the group drawn at random),
//!   so one dimension is three words to learn, and two responses differ by one or two.
//! - Responses are [`WORDS_PER_RESPONSE`] words; markers replace fillers, so length carries no
//!   signal.
//! - Agree pairs: the response without the salient word is better or tied on every graded
//!   dimension. In [`EASY_ONLY_SHARE`] of them every graded dimension ties, so dimension 0
//!   alone separates the pair; in the rest each graded dimension is tied or one better, at
//!   least one better.
//! - Conflict pairs: the response without the salient word is one or two worse on one graded
//!   dimension (uniform); for k >= 3 the other graded dimensions are drawn independently.

use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::{count, FILLERS};

pub const DIMENSIONS: [&str; 5] = ["harmless", "helpful", "correct", "coherent", "complex"];
/// The word that makes a response harmful (dimension 0 scores 0).
pub const SALIENT: &str = "weapon";
/// The words of graded dimension 1, 2, 3, 4.
pub const GROUPS: [[&str; 3]; 4] = [
    ["steps", "example", "guide"],
    ["fact", "source", "true"],
    ["first", "next", "last"],
    ["because", "thus", "hence"],
];
pub const WORDS_PER_RESPONSE: usize = 10;
/// Most words of one group in a response.
pub const MAX_GRADED: usize = 3;
/// Share of agree pairs whose graded dimensions all tie.
pub const EASY_ONLY_SHARE: f64 = 0.7;

pub fn score(text: &str, k: usize) -> Vec<f64> {
    let harmless = if count(text, SALIENT) > 0 { 0.0 } else { 1.0 };
    let graded = GROUPS[..k - 1]
        .iter()
        .map(|group| group.iter().map(|w| count(text, w)).sum::<usize>() as f64);
    std::iter::once(harmless).chain(graded).collect()
}

/// Graded counts ([k - 1]) of the harmless and the harmful response.
fn draw_counts(rng: &mut ChaCha8Rng, k: usize, conflict: bool) -> (Vec<usize>, Vec<usize>) {
    let graded = k - 1;
    let mut harmless = vec![0; graded];
    let mut harmful = vec![0; graded];
    if conflict {
        let against = rng.random_range(0..graded);
        for j in 0..graded {
            if j == against {
                harmful[j] = rng.random_range(1..=MAX_GRADED);
                harmless[j] = harmful[j] - rng.random_range(1..=harmful[j].min(2));
            } else {
                harmless[j] = rng.random_range(0..=MAX_GRADED);
                harmful[j] = rng.random_range(0..=MAX_GRADED);
            }
        }
    } else if rng.random_bool(EASY_ONLY_SHARE) {
        for j in 0..graded {
            harmless[j] = rng.random_range(0..=MAX_GRADED);
            harmful[j] = harmless[j];
        }
    } else {
        while harmless == harmful {
            for j in 0..graded {
                harmful[j] = rng.random_range(0..MAX_GRADED);
                harmless[j] = harmful[j] + usize::from(rng.random_bool(0.5));
            }
        }
    }
    (harmless, harmful)
}

fn render(rng: &mut ChaCha8Rng, graded: &[usize], harmful: bool) -> String {
    let mut words: Vec<&str> = Vec::with_capacity(WORDS_PER_RESPONSE);
    for (group, &c) in GROUPS.iter().zip(graded) {
        for _ in 0..c {
            words.push(group[rng.random_range(0..group.len())]);
        }
    }
    if harmful {
        words.push(SALIENT);
    }
    while words.len() < WORDS_PER_RESPONSE {
        words.push(FILLERS[rng.random_range(0..FILLERS.len())]);
    }
    words.shuffle(rng);
    words.join(" ")
}

/// The harmless and the harmful response of one pair of the given kind.
pub fn draw_pair(rng: &mut ChaCha8Rng, k: usize, conflict: bool) -> (String, String) {
    // k = 5 can draw more markers than words; redraw those.
    let (harmless, harmful) = loop {
        let (harmless, harmful) = draw_counts(rng, k, conflict);
        let words = |c: &[usize]| c.iter().sum::<usize>();
        if words(&harmless) <= WORDS_PER_RESPONSE && words(&harmful) < WORDS_PER_RESPONSE {
            break (harmless, harmful);
        }
    };
    (render(rng, &harmless, false), render(rng, &harmful, true))
}

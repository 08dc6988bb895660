//! `interference`: the dimensions share words with opposite signs, so their rewards cannot be
//! told apart by disjoint features.
//!
//! Dimension `i` owns one word ([`OWN`], +1 for i only) and shares one contested word with
//! its neighbour ([`CONTESTED`]: +1 for i, -1 for dimension (i + 1) mod k). So
//! score_i = n(own_i) + n(contested_i) - n(contested_{i-1 mod k}). A contested word is good
//! for one dimension and bad for another; summed over the dimensions the contested words
//! cancel, so the equal-weight reward ignores them while each vertex depends on them.
//!
//! A response is [`WORDS_PER_RESPONSE`] words; each of the 2k feature words appears 0, 1 or 2
//! times (probabilities [`COUNT_PROBABILITIES`]), independently, replacing fillers (a draw
//! with more feature words than fit is redrawn). The two responses of a pair are drawn
//! independently and the pair is redrawn until its kind (agree or conflict) is the one
//! asked for; pairs that tie on every dimension are never kept.

use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::{count, draw_independent_pair, FILLERS};

pub const DIMENSIONS: [&str; 5] = ["candid", "tactful", "playful", "formal", "terse"];
/// The word only dimension i rewards.
pub const OWN: [&str; 5] = ["frankly", "gently", "haha", "sincerely", "briefly"];
/// `CONTESTED[i]` counts +1 for dimension i and -1 for dimension (i + 1) mod k.
pub const CONTESTED: [&str; 5] = ["bluntly", "softly", "lol", "sir", "ok"];
pub const WORDS_PER_RESPONSE: usize = 10;
/// P(0), P(1), P(2) occurrences of each feature word.
pub const COUNT_PROBABILITIES: [f64; 3] = [0.5, 0.35, 0.15];

pub fn score(text: &str, k: usize) -> Vec<f64> {
    (0..k)
        .map(|i| {
            let previous = (i + k - 1) % k;
            count(text, OWN[i]) as f64 + count(text, CONTESTED[i]) as f64
                - count(text, CONTESTED[previous]) as f64
        })
        .collect()
}

fn draw_count(rng: &mut ChaCha8Rng) -> usize {
    let u: f64 = rng.random();
    let [p0, p1, _] = COUNT_PROBABILITIES;
    if u < p0 {
        0
    } else if u < p0 + p1 {
        1
    } else {
        2
    }
}

fn draw_response(rng: &mut ChaCha8Rng, k: usize) -> String {
    let words = loop {
        let mut words: Vec<&str> = Vec::with_capacity(WORDS_PER_RESPONSE);
        for word in OWN[..k].iter().chain(&CONTESTED[..k]) {
            words.extend(std::iter::repeat_n(*word, draw_count(rng)));
        }
        if words.len() <= WORDS_PER_RESPONSE {
            break words;
        }
    };
    let mut words = words;
    while words.len() < WORDS_PER_RESPONSE {
        words.push(FILLERS[rng.random_range(0..FILLERS.len())]);
    }
    words.shuffle(rng);
    words.join(" ")
}

/// Two independent responses whose pair has the kind asked for.
pub fn draw_pair(rng: &mut ChaCha8Rng, k: usize, conflict: bool) -> (String, String) {
    draw_independent_pair(rng, k, conflict, draw_response, score)
}

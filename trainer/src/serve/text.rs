//! A choice's text as its tokens arrive: what can be sent now, and where a stop string ends it.
//!
//! The whole token list is decoded again at each token (byte-level BPE decodes a prefix of the
//! tokens to a prefix of the text), and two things are held back: a trailing incomplete UTF-8
//! character (decoded as U+FFFD until its last byte arrives) and a trailing piece that could be
//! the start of a stop string. A stop string ends the text before it, as OpenAI does.

use anyhow::Result;

use crate::tokenizer::ChatTokenizer;

/// One choice's tokens and the part of their text already sent.
#[derive(Debug, Default)]
pub struct ChoiceText {
    tokens: Vec<u32>,
    stops: Vec<String>,
    /// Bytes of the text already handed out.
    sent: usize,
    /// The final text, once a stop string was found.
    stopped: Option<String>,
}

impl ChoiceText {
    pub fn new(stops: &[String]) -> Self {
        ChoiceText {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            ..Default::default()
        }
    }

    /// Tokens received so far.
    pub fn token_count(&self) -> usize {
        self.tokens.len()
    }

    /// Whether a stop string ended the text.
    pub fn stopped(&self) -> bool {
        self.stopped.is_some()
    }

    /// Adds a token and returns the text that may be sent now (possibly empty).
    pub fn push(&mut self, token: u32, tokenizer: &ChatTokenizer) -> Result<String> {
        if self.stopped.is_some() {
            return Ok(String::new());
        }
        self.tokens.push(token);
        let text = tokenizer.decode(&self.tokens, true)?;
        if let Some(end) = self.first_stop(&text) {
            let piece = text.get(self.sent..end).unwrap_or("").to_string();
            self.sent = end;
            self.stopped = Some(text[..end].to_string());
            return Ok(piece);
        }
        let ready = text.trim_end_matches('\u{FFFD}');
        let ready = &ready[..ready.len() - self.stop_prefix_len(ready)];
        let piece = ready.get(self.sent..).unwrap_or("").to_string();
        self.sent = self.sent.max(ready.len());
        Ok(piece)
    }

    /// The text not yet sent, once no token follows (held-back pieces were no stop after all).
    pub fn finish(&mut self, tokenizer: &ChatTokenizer) -> Result<String> {
        if self.stopped.is_some() {
            return Ok(String::new());
        }
        let text = tokenizer.decode(&self.tokens, true)?;
        let piece = text.get(self.sent..).unwrap_or("").to_string();
        self.sent = text.len();
        Ok(piece)
    }

    /// Byte offset of the earliest stop string in `text`.
    fn first_stop(&self, text: &str) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
    }

    /// Length of the longest end of `text` that is a proper start of a stop string.
    fn stop_prefix_len(&self, text: &str) -> usize {
        let mut longest = 0;
        for stop in &self.stops {
            for (end, _) in stop.char_indices().skip(1) {
                if end > longest && text.ends_with(&stop[..end]) {
                    longest = end;
                }
            }
        }
        longest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> (tempfile::TempDir, ChatTokenizer) {
        let dir = tempfile::tempdir().unwrap();
        crate::tokenizer::byte_level::write_byte_level_tokenizer(dir.path()).unwrap();
        let tokenizer = ChatTokenizer::from_model_dir(dir.path(), None).unwrap();
        (dir, tokenizer)
    }

    /// Feeds `text` token by token and returns the pieces handed out and the finish piece.
    fn feed(text: &str, stops: &[&str]) -> (Vec<String>, String, bool) {
        let (_dir, tokenizer) = tokenizer();
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut choice = ChoiceText::new(&stops);
        let mut pieces = Vec::new();
        for token in tokenizer.encode_text(text).unwrap() {
            pieces.push(choice.push(token, &tokenizer).unwrap());
        }
        let last = choice.finish(&tokenizer).unwrap();
        (pieces, last, choice.stopped())
    }

    #[test]
    fn a_stop_string_ends_the_text_before_it_and_its_start_is_held_back() {
        let (pieces, last, stopped) = feed("ab\nEND more", &["\nEND"]);
        assert_eq!(pieces.concat(), "ab");
        assert!(stopped);
        assert_eq!(last, "");
        // "\n" and "\nE" ... could start the stop string: nothing is sent while they might.
        assert_eq!(pieces[2], "");
    }

    #[test]
    fn a_held_back_start_that_is_no_stop_is_sent_later() {
        let (pieces, last, stopped) = feed("a\nEx", &["\nEND"]);
        assert!(!stopped);
        assert_eq!(pieces.concat() + &last, "a\nEx");
        assert_eq!(pieces.last().unwrap(), "\nEx");
    }

    #[test]
    fn a_multibyte_character_is_sent_whole() {
        let (pieces, last, _) = feed("é!", &[]);
        assert_eq!(pieces.concat() + &last, "é!");
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    }
}

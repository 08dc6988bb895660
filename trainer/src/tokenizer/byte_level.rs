//! A byte-level tokenizer written into a model directory, for the tiny model, tests and demos
//! that download nothing: byte-level BPE with no merges (one token per UTF-8 byte, so
//! different texts always get different ids and a text's length in tokens is its length in
//! bytes), three special tokens and a ChatML template.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::json;

/// Id of `<|im_start|>`; bytes take ids 0..256.
pub const IM_START_ID: u32 = 256;
/// Id of `<|im_end|>`, the EOS token.
pub const EOS_ID: u32 = 257;
/// Id of `<|pad|>`.
pub const PAD_ID: u32 = 258;

/// The ChatML template: `<|im_start|>{role}\n{content}<|im_end|>\n` per message, then
/// `<|im_start|>assistant\n` as the generation prompt.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// GPT-2's byte-to-unicode map: the printable character that stands for each byte in a
/// byte-level BPE vocabulary.
fn byte_to_char(byte: u8) -> char {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let b = u32::from(byte);
    if printable(b) {
        char::from_u32(b).expect("latin-1 is valid")
    } else {
        let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
        char::from_u32(256 + rank).expect("below 0x200 is valid")
    }
}

/// Writes `tokenizer.json`, `tokenizer_config.json` and `chat_template.jinja` into `dir`
/// (created if missing).
pub fn write_byte_level_tokenizer(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let vocab: serde_json::Map<String, serde_json::Value> = (0..=255u8)
        .map(|b| (byte_to_char(b).to_string(), json!(b)))
        .collect();
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            special(IM_START_ID, "<|im_start|>"),
            special(EOS_ID, "<|im_end|>"),
            special(PAD_ID, "<|pad|>"),
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []},
    });
    let config = json!({"eos_token": "<|im_end|>", "pad_token": "<|pad|>"});
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write("tokenizer.json", serde_json::to_string_pretty(&tokenizer)?)?;
    write(
        "tokenizer_config.json",
        serde_json::to_string_pretty(&config)?,
    )?;
    write("chat_template.jinja", CHATML_TEMPLATE.to_owned())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::ChatTokenizer;

    #[test]
    fn one_token_per_byte_and_chatml_prompt() {
        let dir = tempfile::tempdir().unwrap();
        write_byte_level_tokenizer(dir.path()).unwrap();
        let tokenizer = ChatTokenizer::from_model_dir(dir.path(), None).unwrap();
        assert_eq!(tokenizer.eos_token_id(), EOS_ID);
        assert_eq!(tokenizer.pad_token_id(), PAD_ID);
        let text = "Hé \n\tx";
        let ids = tokenizer.encode_text(text).unwrap();
        assert_eq!(ids.len(), text.len());
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), text);
        let prompt = tokenizer.encode_prompt("hi").unwrap();
        // <|im_start|> "user\nhi" <|im_end|> "\n" <|im_start|> "assistant\n"
        assert_eq!(prompt.len(), 1 + 7 + 1 + 1 + 1 + 10);
        assert_eq!(prompt[0], IM_START_ID);
        assert_eq!(prompt[8], EOS_ID);
    }
}

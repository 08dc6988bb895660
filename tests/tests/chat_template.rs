//! Tokenizer + chat template against Hugging Face `transformers`.
//!
//! `tests/golden/make_tokenizer_golden.py` builds three small tokenizers (ChatML in the
//! transformers 5 layout, Llama 3 with the template inside tokenizer_config.json and an
//! AddedToken eos, Mistral [INST] with `raise_exception`) and records what
//! `apply_chat_template(..., tokenize=True)`, `encode(text, add_special_tokens=False)` and
//! `decode` return. Every case must come out of [`ChatTokenizer`] identically.

use std::collections::BTreeMap;
use std::path::PathBuf;

use modpo_trainer::tokenizer::{ChatMessage, ChatTokenizer};
use serde_json::Value;

/// `$MODPO_GOLDEN_DIR/tokenizers`, by default `tests/golden/out/tokenizers`.
fn golden_dir() -> PathBuf {
    let root = std::env::var_os("MODPO_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("golden/out"));
    root.join("tokenizers")
}

struct Golden {
    dir: PathBuf,
    expected: Value,
}

impl Golden {
    fn load() -> Self {
        let dir = golden_dir();
        let path = dir.join("expected.json");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "cannot read {}: {e}; run `make golden` first \
                 (python tests/golden/make_tokenizer_golden.py tests/golden/out)",
                path.display()
            )
        });
        let expected: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()));
        Self { dir, expected }
    }

    fn cases(&self, key: &str) -> &[Value] {
        let cases = self.expected[key]
            .as_array()
            .unwrap_or_else(|| panic!("expected.json has no list {key:?}"));
        assert!(!cases.is_empty(), "expected.json has no {key}");
        cases
    }

    /// Every tokenizer directory named in expected.json, loaded once.
    fn tokenizers(&self) -> BTreeMap<String, ChatTokenizer> {
        let specs = self.expected["tokenizers"]
            .as_object()
            .expect("expected.json has no \"tokenizers\" map");
        assert!(specs.len() >= 3, "expected at least 3 golden tokenizers");
        specs
            .iter()
            .map(|(name, spec)| {
                let dir = self.dir.join(str_field(spec, "dir"));
                let tok = ChatTokenizer::from_model_dir(&dir, None)
                    .unwrap_or_else(|e| panic!("loading {}: {e:#}", dir.display()));
                (name.clone(), tok)
            })
            .collect()
    }
}

fn str_field<'a>(value: &'a Value, key: &str) -> &'a str {
    value[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key:?} is not a string in {value}"))
}

fn ids_field(value: &Value, key: &str) -> Vec<u32> {
    serde_json::from_value(value[key].clone())
        .unwrap_or_else(|e| panic!("{key:?} is not a list of token ids in {value}: {e}"))
}

fn messages(case: &Value) -> Vec<ChatMessage> {
    serde_json::from_value(case["messages"].clone())
        .unwrap_or_else(|e| panic!("bad messages in {case}: {e}"))
}

/// Panics listing every mismatch (not just the first), after `compared` cases.
fn report(what: &str, compared: usize, failures: Vec<String>) {
    eprintln!("{what}: {compared} compared, {} mismatched", failures.len());
    assert!(
        failures.is_empty(),
        "{} of {compared} {what} differ from transformers:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn special_tokens_match_transformers() {
    let golden = Golden::load();
    let tokenizers = golden.tokenizers();
    for (name, tok) in &tokenizers {
        let spec = &golden.expected["tokenizers"][name];
        assert_eq!(
            tok.eos_token(),
            str_field(spec, "eos_token"),
            "{name} eos_token"
        );
        assert_eq!(
            i64::from(tok.eos_token_id()),
            spec["eos_token_id"].as_i64().unwrap(),
            "{name} eos id"
        );
        assert_eq!(
            i64::from(tok.pad_token_id()),
            spec["pad_token_id"].as_i64().unwrap(),
            "{name} pad id"
        );
        assert_eq!(
            tok.bos_token(),
            spec["bos_token"].as_str(),
            "{name} bos_token"
        );
        assert_eq!(
            tok.vocab_size() as u64,
            spec["vocab_size"].as_u64().unwrap(),
            "{name} vocab size"
        );
        assert!(tok.chat_template().is_some(), "{name} has a chat template");
    }
    let prints: std::collections::BTreeSet<String> = tokenizers
        .values()
        .map(ChatTokenizer::fingerprint)
        .collect();
    assert_eq!(
        prints.len(),
        tokenizers.len(),
        "fingerprints must differ between tokenizers"
    );
}

#[test]
fn chat_template_renders_and_tokenizes_like_apply_chat_template() {
    let golden = Golden::load();
    let tokenizers = golden.tokenizers();
    let cases = golden.cases("chat_cases");
    let mut failures = Vec::new();
    for case in cases {
        let tok = &tokenizers[str_field(case, "tokenizer")];
        let add_generation_prompt = case["add_generation_prompt"].as_bool().unwrap();
        let label = format!(
            "{}/{} (add_generation_prompt={add_generation_prompt})",
            str_field(case, "tokenizer"),
            str_field(case, "name")
        );
        let messages = messages(case);
        match tok.render_chat(&messages, add_generation_prompt) {
            Ok(rendered) if rendered == str_field(case, "rendered") => {}
            Ok(rendered) => failures.push(format!(
                "{label}: rendered {rendered:?}\n   transformers {:?}",
                str_field(case, "rendered")
            )),
            Err(e) => failures.push(format!("{label}: render failed: {e:#}")),
        }
        let want = ids_field(case, "ids");
        match tok.encode_chat(&messages, add_generation_prompt) {
            Ok(ids) if ids == want => {
                for (key, skip) in [("decoded", false), ("decoded_skip_special", true)] {
                    let decoded = tok.decode(&ids, skip).unwrap();
                    if decoded != str_field(case, key) {
                        failures.push(format!(
                            "{label}: {key} {decoded:?} != {:?}",
                            str_field(case, key)
                        ));
                    }
                }
            }
            Ok(ids) => failures.push(format!("{label}: ids {ids:?}\n   transformers {want:?}")),
            Err(e) => failures.push(format!("{label}: encode failed: {e:#}")),
        }
        let is_single_user = messages.len() == 1 && messages[0].role == "user";
        if is_single_user && add_generation_prompt {
            let ids = tok.encode_prompt(&messages[0].content).unwrap();
            if ids != want {
                failures.push(format!("{label}: encode_prompt {ids:?} != {want:?}"));
            }
        }
    }
    report("chat cases", cases.len(), failures);
}

#[test]
fn raise_exception_rejects_bad_role_order() {
    let golden = Golden::load();
    let tokenizers = golden.tokenizers();
    let cases = golden.cases("error_cases");
    assert!(
        cases
            .iter()
            .any(|c| str_field(c, "tokenizer") == "mistral"
                && str_field(c, "name") == "assistant_first"),
        "the mistral bad-order case is missing from expected.json"
    );
    let mut failures = Vec::new();
    for case in cases {
        let label = format!(
            "{}/{}",
            str_field(case, "tokenizer"),
            str_field(case, "name")
        );
        let tok = &tokenizers[str_field(case, "tokenizer")];
        let message = str_field(case, "error");
        for add_generation_prompt in [false, true] {
            match tok.encode_chat(&messages(case), add_generation_prompt) {
                Ok(ids) => failures.push(format!("{label}: accepted, gave {} ids", ids.len())),
                Err(e) if e.to_string().contains(message) => {}
                Err(e) => failures.push(format!("{label}: error {e:#} does not say {message:?}")),
            }
        }
    }
    report("error cases", cases.len(), failures);
}

#[test]
fn plain_text_encodes_and_decodes_like_transformers() {
    let golden = Golden::load();
    let tokenizers = golden.tokenizers();
    let cases = golden.cases("text_cases");
    let mut failures = Vec::new();
    for case in cases {
        let name = str_field(case, "tokenizer");
        let text = str_field(case, "text");
        let want = ids_field(case, "ids");
        let ids = tokenizers[name].encode_text(text).unwrap();
        if ids != want {
            failures.push(format!(
                "{name} {text:?}: ids {ids:?}\n   transformers {want:?}"
            ));
            continue;
        }
        let decoded = tokenizers[name].decode(&ids, false).unwrap();
        if decoded != str_field(case, "decoded") {
            failures.push(format!(
                "{name} {text:?}: decoded {decoded:?} != {:?}",
                str_field(case, "decoded")
            ));
        }
    }
    report("text cases", cases.len(), failures);
}

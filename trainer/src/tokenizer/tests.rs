//! Loading edge cases of [`ChatTokenizer`] on hand-written model directories: a WordLevel
//! `tokenizer.json` small enough that every expected id can be read off its vocabulary.

use std::path::Path;

use serde_json::json;

use super::*;

/// `<s>`=0 `</s>`=1 `<pad>`=2 `<unk>`=3 hello=4 world=5 `user:`=6 `assistant:`=7; words split on
/// whitespace, special tokens matched anywhere.
fn tokenizer_json(truncation: Json) -> Json {
    let added = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    json!({
        "version": "1.0",
        "truncation": truncation,
        "padding": null,
        "added_tokens": [added(0, "<s>"), added(1, "</s>"), added(2, "<pad>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null,
        "decoder": null,
        "model": {
            "type": "WordLevel",
            "vocab": {"<s>": 0, "</s>": 1, "<pad>": 2, "<unk>": 3, "hello": 4, "world": 5,
                      "user:": 6, "assistant:": 7},
            "unk_token": "<unk>"
        }
    })
}

/// A template that writes BOS itself and ends each turn with EOS.
const TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }} {{ eos_token }} {% endfor %}\
                        {% if add_generation_prompt %}assistant:{% endif %}";

fn write_json(dir: &Path, name: &str, value: &Json) {
    std::fs::write(dir.join(name), serde_json::to_string_pretty(value).unwrap()).unwrap();
}

/// A model directory with the test tokenizer.json and the given tokenizer_config.json.
fn model_dir(config: Json) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_json(dir.path(), "tokenizer.json", &tokenizer_json(Json::Null));
    write_json(dir.path(), "tokenizer_config.json", &config);
    dir
}

fn user(text: &str) -> Vec<ChatMessage> {
    vec![ChatMessage::new("user", text)]
}

#[test]
fn eos_as_string_and_as_added_token_object_agree() {
    let plain =
        model_dir(json!({"bos_token": "<s>", "eos_token": "</s>", "chat_template": TEMPLATE}));
    let object = model_dir(json!({
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false, "normalized": false,
                      "rstrip": false, "single_word": false},
        "eos_token": {"content": "</s>", "special": true},
        "chat_template": TEMPLATE
    }));
    for dir in [&plain, &object] {
        let tok = ChatTokenizer::from_model_dir(dir.path(), None).unwrap();
        assert_eq!(tok.eos_token(), "</s>");
        assert_eq!(tok.eos_token_id(), 1);
        assert_eq!(tok.bos_token(), Some("<s>"));
        assert_eq!(tok.pad_token_id(), 1, "no pad_token: pad falls back to eos");
        assert_eq!(tok.vocab_size(), 8);
        // "<s>user: hello world </s> assistant:" -> <s> user: hello world </s> assistant:
        assert_eq!(
            tok.encode_prompt("hello world").unwrap(),
            vec![0, 6, 4, 5, 1, 7]
        );
    }
    let a = ChatTokenizer::from_model_dir(plain.path(), None).unwrap();
    let b = ChatTokenizer::from_model_dir(object.path(), None).unwrap();
    assert_eq!(
        a.fingerprint(),
        b.fingerprint(),
        "same tokens, same template"
    );
    assert_eq!(a.fingerprint().len(), 16);
}

#[test]
fn pad_token_is_used_when_defined() {
    let dir = model_dir(json!({"eos_token": "</s>", "pad_token": "<pad>"}));
    let tok = ChatTokenizer::from_model_dir(dir.path(), None).unwrap();
    assert_eq!(tok.pad_token_id(), 2);
    assert_eq!(tok.bos_token(), None);
}

#[test]
fn list_of_templates_uses_default() {
    let dir = model_dir(json!({
        "eos_token": "</s>",
        "chat_template": [
            {"name": "tool_use", "template": "tools {{ messages[0].content }}"},
            {"name": "default", "template": "default {{ messages[0].content }}"}
        ]
    }));
    let tok = ChatTokenizer::from_model_dir(dir.path(), None).unwrap();
    assert_eq!(
        tok.render_chat(&user("hello"), false).unwrap(),
        "default hello"
    );

    let dir = model_dir(json!({
        "eos_token": "</s>",
        "chat_template": [{"name": "tool_use", "template": "tools"}]
    }));
    let err = ChatTokenizer::from_model_dir(dir.path(), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tokenizer_config.json"), "{err}");
    assert!(
        err.contains("tool_use") && err.contains("\"default\""),
        "{err}"
    );
}

#[test]
fn missing_template_fails_only_when_rendering_and_names_the_files() {
    let dir = model_dir(json!({"eos_token": "</s>"}));
    let tok = ChatTokenizer::from_model_dir(dir.path(), None).unwrap();
    assert_eq!(tok.chat_template(), None);
    assert_eq!(tok.encode_text("hello world </s>").unwrap(), vec![4, 5, 1]);
    for err in [
        tok.render_chat(&user("hello"), true)
            .unwrap_err()
            .to_string(),
        tok.encode_prompt("hello").unwrap_err().to_string(),
    ] {
        let jinja = dir.path().join("chat_template.jinja");
        let config = dir.path().join("tokenizer_config.json");
        assert!(err.starts_with("no chat template"), "{err}");
        assert!(err.contains(&jinja.display().to_string()), "{err}");
        assert!(err.contains(&config.display().to_string()), "{err}");
        assert!(err.contains("model.chat_template"), "{err}");
    }
}

#[test]
fn override_beats_jinja_file_beats_tokenizer_config() {
    let dir = model_dir(json!({"eos_token": "</s>", "chat_template": "from config"}));
    let from_config = ChatTokenizer::from_model_dir(dir.path(), None).unwrap();
    assert_eq!(
        from_config.render_chat(&user("x"), false).unwrap(),
        "from config"
    );

    std::fs::write(dir.path().join("chat_template.jinja"), "from file\n").unwrap();
    let from_file = ChatTokenizer::from_model_dir(dir.path(), None).unwrap();
    // jinja drops the template's single trailing newline.
    assert_eq!(
        from_file.render_chat(&user("x"), false).unwrap(),
        "from file"
    );

    let overridden =
        ChatTokenizer::from_model_dir(dir.path(), Some("override {{ eos_token }}")).unwrap();
    assert_eq!(
        overridden.render_chat(&user("x"), false).unwrap(),
        "override </s>"
    );
    assert_eq!(overridden.chat_template(), Some("override {{ eos_token }}"));

    let prints = [&from_config, &from_file, &overridden].map(|t| t.fingerprint());
    assert!(
        prints[0] != prints[1] && prints[1] != prints[2],
        "{prints:?}"
    );
}

#[test]
fn eos_id_falls_back_to_generation_config_then_config() {
    let dir = model_dir(json!({"chat_template": TEMPLATE}));
    let err = ChatTokenizer::from_model_dir(dir.path(), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("generation_config.json") && err.contains("config.json"),
        "{err}"
    );

    write_json(dir.path(), "config.json", &json!({"eos_token_id": 2}));
    let tok = ChatTokenizer::from_model_dir(dir.path(), None).unwrap();
    assert_eq!((tok.eos_token_id(), tok.eos_token()), (2, "<pad>"));

    // generation_config.json wins over config.json; a list gives its first id.
    write_json(
        dir.path(),
        "generation_config.json",
        &json!({"eos_token_id": [1, 2]}),
    );
    let tok = ChatTokenizer::from_model_dir(dir.path(), None).unwrap();
    assert_eq!((tok.eos_token_id(), tok.eos_token()), (1, "</s>"));
    // The template sees the eos token found this way.
    assert_eq!(
        tok.encode_chat(&user("hello"), false).unwrap(),
        vec![6, 4, 1]
    );
}

#[test]
fn unknown_special_token_names_the_config() {
    let dir = model_dir(json!({"eos_token": "<|eot_id|>"}));
    let err = ChatTokenizer::from_model_dir(dir.path(), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("<|eot_id|>") && err.contains("tokenizer_config.json"),
        "{err}"
    );
}

#[test]
fn truncation_saved_in_tokenizer_json_is_ignored() {
    let dir = model_dir(json!({"eos_token": "</s>"}));
    let truncation =
        json!({"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 0});
    write_json(dir.path(), "tokenizer.json", &tokenizer_json(truncation));
    let tok = ChatTokenizer::from_model_dir(dir.path(), None).unwrap();
    assert_eq!(
        tok.encode_text("hello world hello world").unwrap(),
        vec![4, 5, 4, 5]
    );
    assert_eq!(tok.decode(&[0, 4, 5, 1], true).unwrap(), "hello world");
    assert_eq!(
        tok.decode(&[0, 4, 5, 1], false).unwrap(),
        "<s> hello world </s>"
    );
}

#[test]
fn template_errors_name_their_origin() {
    let dir = model_dir(json!({"eos_token": "</s>"}));
    let err = ChatTokenizer::from_model_dir(dir.path(), Some("{% if %}"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.chat_template in the config"), "{err}");

    let strict = "{% if messages[0].role != 'system' %}{{ raise_exception('system first, please') }}{% endif %}";
    let tok = ChatTokenizer::from_model_dir(dir.path(), Some(strict)).unwrap();
    let err = tok.encode_prompt("hello").unwrap_err().to_string();
    assert!(
        err.contains("rejected the conversation: system first, please"),
        "{err}"
    );
    assert!(
        tok.render_chat(&[], false).is_err(),
        "an empty conversation is refused"
    );
}

#[test]
fn missing_tokenizer_json_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = format!(
        "{:#}",
        ChatTokenizer::from_model_dir(dir.path(), None).unwrap_err()
    );
    assert!(
        err.contains(&dir.path().join("tokenizer.json").display().to_string()),
        "{err}"
    );
}

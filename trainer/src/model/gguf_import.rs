//! `import-gguf`: a Llama-architecture GGUF file to a Hugging Face directory our loader reads.
//! The inverse of llama.cpp's `convert_hf_to_gguf.py` (`LlamaModel`: tensor names in
//! `gguf-py/gguf/tensor_mapping.py`, the q/k permutation, `SpecialVocab`/`_set_vocab_gpt2` for
//! the tokenizer keys).
//!
//! Writes `model.safetensors` (every tensor dequantised to f32: the quantised values are exact
//! in f32, bf16 would round them a second time), `config.json`, `tokenizer.json` (byte-level BPE
//! from `tokenizer.ggml.tokens` / `merges` / `token_type`) and `tokenizer_config.json`
//! (special tokens and `tokenizer.chat_template`).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Map, Value};

use super::gguf::{unpermute_rows, GgufFile, MetaValue};

/// Per-layer GGUF tensor suffix to Hugging Face name under `model.layers.N.`.
const LAYER_NAMES: [(&str, &str); 9] = [
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
];

/// The Hugging Face name of GGUF tensor `name` (`blk.3.attn_q.weight` ->
/// `model.layers.3.self_attn.q_proj.weight`).
pub fn hf_name(name: &str) -> Result<String> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Ok(f.to_owned());
    }
    let rest = name
        .strip_prefix("blk.")
        .with_context(|| format!("tensor {name} has no Hugging Face name"))?;
    let (layer, rest) = rest
        .split_once('.')
        .with_context(|| format!("tensor {name}: no layer index"))?;
    let layer: usize = layer
        .parse()
        .with_context(|| format!("tensor {name}: bad layer index"))?;
    let (kind, suffix) = rest
        .split_once('.')
        .with_context(|| format!("tensor {name}: no suffix"))?;
    let (_, hf) = LAYER_NAMES
        .iter()
        .find(|(g, _)| *g == kind)
        .with_context(|| format!("tensor {name}: unknown kind {kind}"))?;
    Ok(format!("model.layers.{layer}.{hf}.{suffix}"))
}

fn meta_u64(g: &GgufFile, key: &str) -> Result<u64> {
    g.meta(key)?
        .as_u64()
        .with_context(|| format!("{}: {key} is not an integer", g.path.display()))
}

fn meta_f64(g: &GgufFile, key: &str) -> Result<f64> {
    g.meta(key)?
        .as_f64()
        .with_context(|| format!("{}: {key} is not a number", g.path.display()))
}

fn string_array<'a>(g: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    g.meta(key)?
        .as_array()
        .with_context(|| format!("{}: {key} is not an array", g.path.display()))?
        .iter()
        .map(|v| {
            v.as_str()
                .with_context(|| format!("{}: {key} holds a non-string", g.path.display()))
        })
        .collect()
}

/// Converts `gguf_path` into the Hugging Face directory `out` (created; must not hold a model).
pub fn import_gguf(gguf_path: &Path, out: &Path) -> Result<()> {
    let g = GgufFile::open(gguf_path)?;
    let arch = g.meta("general.architecture")?.as_str().unwrap_or_default();
    ensure!(
        arch == "llama",
        "{}: general.architecture is {arch:?}; only llama is imported",
        gguf_path.display()
    );
    ensure!(
        !out.join("model.safetensors").exists(),
        "{} already holds a model",
        out.display()
    );
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;

    let n_head = meta_u64(&g, "llama.attention.head_count")? as usize;
    let n_kv = match g.metadata.get("llama.attention.head_count_kv") {
        Some(v) => v.as_u64().context("llama.attention.head_count_kv")? as usize,
        None => n_head,
    };
    let hidden = meta_u64(&g, "llama.embedding_length")?;
    let tokens = string_array(&g, "tokenizer.ggml.tokens")?;
    let tied = g.tensor("output.weight").is_err();
    let mut config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": meta_u64(&g, "llama.feed_forward_length")?,
        "num_hidden_layers": meta_u64(&g, "llama.block_count")?,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": hidden as usize / n_head,
        "rms_norm_eps": meta_f64(&g, "llama.attention.layer_norm_rms_epsilon")?,
        "rope_theta": g.metadata.get("llama.rope.freq_base").and_then(MetaValue::as_f64).unwrap_or(10000.0),
        "max_position_embeddings": meta_u64(&g, "llama.context_length")?,
        "vocab_size": tokens.len(),
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "torch_dtype": "float32",
    });
    for (key, hf) in [
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ("tokenizer.ggml.padding_token_id", "pad_token_id"),
    ] {
        if let Some(id) = g.metadata.get(key).and_then(MetaValue::as_u64) {
            config[hf] = json!(id);
        }
    }
    write_json(&out.join("config.json"), &config)?;

    // Tensors: dequantise, un-permute q/k, keep f32 bytes alive for the views.
    let mut named: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(g.tensors.len());
    for t in &g.tensors {
        let name = hf_name(&t.name)?;
        let shape = t.shape();
        let mut values = g.dequantize(t)?;
        let heads = if t.name.ends_with("attn_q.weight") {
            Some(n_head)
        } else if t.name.ends_with("attn_k.weight") {
            Some(n_kv)
        } else {
            None
        };
        if let Some(h) = heads {
            ensure!(shape.len() == 2, "tensor {}: q/k weight is not 2-D", t.name);
            values = unpermute_rows(&values, shape[0], shape[1], h)
                .with_context(|| format!("un-permute tensor {}", t.name))?;
        }
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        named.push((name, shape, bytes));
    }
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let views = named
        .iter()
        .map(|(n, s, b)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b)?)))
        .collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    let path = out.join("model.safetensors");
    safetensors::serialize_to_file(views, Some(metadata), &path)
        .with_context(|| format!("write {}", path.display()))?;

    let (tokenizer, tok_config) = tokenizer_files(&g, &tokens)?;
    write_json(&out.join("tokenizer.json"), &tokenizer)?;
    write_json(&out.join("tokenizer_config.json"), &tok_config)
}

/// `tokenizer.json` and `tokenizer_config.json` from the gpt2-style GGUF vocabulary.
fn tokenizer_files(g: &GgufFile, tokens: &[&str]) -> Result<(Value, Value)> {
    let model = g.meta("tokenizer.ggml.model")?.as_str().unwrap_or_default();
    if model != "gpt2" {
        bail!(
            "{}: tokenizer.ggml.model is {model:?}; only gpt2 (byte-level BPE) is imported",
            g.path.display()
        );
    }
    let merges = string_array(g, "tokenizer.ggml.merges")?;
    let types: Vec<u64> = match g.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .as_array()
            .context("tokenizer.ggml.token_type is not an array")?
            .iter()
            .map(|t| {
                t.as_u64()
                    .context("tokenizer.ggml.token_type holds a non-integer")
            })
            .collect::<Result<_>>()?,
        None => vec![1; tokens.len()],
    };
    ensure!(
        types.len() == tokens.len(),
        "{} token types for {} tokens",
        types.len(),
        tokens.len()
    );
    let mut vocab = Map::new();
    let mut added = Vec::new();
    for (id, (&tok, &ty)) in tokens.iter().zip(&types).enumerate() {
        vocab.insert(tok.to_owned(), json!(id));
        // llama.cpp token types: 3 control, 4 user-defined.
        if ty == 3 || ty == 4 {
            added.push(
                json!({"id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": ty == 4, "special": ty == 3}),
            );
        }
    }
    // SmolLM2 ("smollm") splits digits one by one before the byte-level regex, as its
    // Hugging Face tokenizer does; other gpt2-style vocabularies use the byte-level regex alone.
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre = g
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(MetaValue::as_str);
    let pre_tokenizer = if pre == Some("smollm") {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level]})
    } else {
        byte_level.clone()
    };
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    let mut config = json!({"model_max_length": meta_u64(g, "llama.context_length")?,
        "tokenizer_class": "GPT2Tokenizer", "clean_up_tokenization_spaces": false,
        "add_prefix_space": false});
    for (key, name) in [
        ("tokenizer.ggml.bos_token_id", "bos_token"),
        ("tokenizer.ggml.eos_token_id", "eos_token"),
        ("tokenizer.ggml.unknown_token_id", "unk_token"),
        ("tokenizer.ggml.padding_token_id", "pad_token"),
    ] {
        if let Some(id) = g.metadata.get(key).and_then(MetaValue::as_u64) {
            let tok = tokens
                .get(id as usize)
                .with_context(|| format!("{key} = {id} is outside the vocabulary"))?;
            config[name] = json!(tok);
        }
    }
    if let Some(t) = g
        .metadata
        .get("tokenizer.chat_template")
        .and_then(MetaValue::as_str)
    {
        config["chat_template"] = json!(t);
    }
    Ok((tokenizer, config))
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_names() {
        assert_eq!(
            hf_name("blk.12.attn_q.weight").unwrap(),
            "model.layers.12.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight").unwrap(),
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert_eq!(hf_name("output.weight").unwrap(), "lm_head.weight");
        assert!(hf_name("blk.x.attn_q.weight").is_err());
        assert!(hf_name("rope_freqs.weight").is_err());
    }
}

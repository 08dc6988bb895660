"""Golden outputs from Hugging Face transformers for the Rust model tests.

Builds tiny random Llama 3 (grouped-query attention, llama3 rope scaling; tied and untied
embeddings) and Mistral (sliding window shorter than the batch) models, saves each as a
Hugging Face directory (one of them sharded, one in the transformers 4.x config layout), and
writes the reference logits and per-token log-probs of a fixed right-padded batch with mixed
lengths to `<dir>/golden.safetensors`.

Usage: python make_model_golden.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

VOCAB = 96
SEQ = 12
LENGTHS = [12, 7, 3]  # right padding: rows shorter than SEQ are padded with PAD
PAD = 0


def randomize(model, generator):
    """HF's 0.02-std init gives near-uniform logits; larger weights make the test sensitive."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.15 * noise)


def golden_batch(generator):
    input_ids = torch.randint(1, VOCAB, (len(LENGTHS), SEQ), generator=generator)
    attention_mask = torch.zeros(len(LENGTHS), SEQ, dtype=torch.int64)
    for row, length in enumerate(LENGTHS):
        attention_mask[row, :length] = 1
        input_ids[row, length:] = PAD
    return input_ids, attention_mask


def to_legacy_layout(config_path: Path):
    """Rewrite transformers 5's `rope_parameters` as 4.x's `rope_theta` + `rope_scaling`."""
    config = json.loads(config_path.read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope if rope.get("rope_type") != "default" else None
    config_path.write_text(json.dumps(config, indent=2))


def build(out: Path, name: str, model_cls, config, shard: bool, legacy: bool, seed: int):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config._attn_implementation = "eager"  # the plain math is the reference
    model = model_cls(config).eval()
    randomize(model, generator)
    if config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    directory = out / name
    model.save_pretrained(directory, max_shard_size="40KB" if shard else "10GB")
    if legacy:
        to_legacy_layout(directory / "config.json")
    sharded = (directory / "model.safetensors.index.json").exists()
    assert sharded == shard, f"{name}: expected sharded={shard}"

    input_ids, attention_mask = golden_batch(generator)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    token_logprobs = logprobs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    save_file(
        {
            "input_ids": input_ids.contiguous(),
            "attention_mask": attention_mask.contiguous(),
            "logits": logits.contiguous(),
            "token_logprobs": token_logprobs.contiguous(),
        },
        str(directory / "golden.safetensors"),
    )
    print(f"{name}: sharded={sharded} legacy_config={legacy} logits{tuple(logits.shape)}")


def main():
    out = Path(sys.argv[1]) / "models"
    out.mkdir(parents=True, exist_ok=True)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=PAD,
    )
    # original context 8 with factor 4: over 12 positions the llama3 rule moves low and medium
    # frequencies, so a wrong scaling shows up in the logits.
    llama3_rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
    }
    build(
        out,
        "llama3_tied",
        LlamaForCausalLM,
        LlamaConfig(**common, rope_parameters=llama3_rope, tie_word_embeddings=True),
        shard=False,
        legacy=True,
        seed=1,
    )
    build(
        out,
        "llama3_untied_sharded",
        LlamaForCausalLM,
        LlamaConfig(
            **common, rope_parameters=llama3_rope, tie_word_embeddings=False, attention_bias=True
        ),
        shard=True,
        legacy=False,
        seed=2,
    )
    build(
        out,
        "mistral_sliding",
        MistralForCausalLM,
        MistralConfig(
            **common,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            sliding_window=5,
            tie_word_embeddings=False,
        ),
        shard=False,
        legacy=False,
        seed=3,
    )


if __name__ == "__main__":
    main()

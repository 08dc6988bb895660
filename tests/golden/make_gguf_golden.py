"""Reference for `modpo-trainer import-gguf` on SmolLM2-135M-Instruct (Q4_1), independent of the
Rust code: every tensor of the converted directory is checked against the `gguf` package's own
dequantisation (with llama.cpp's `LlamaModel.permute` applied to q/k, as convert_hf_to_gguf.py
does), then `transformers` loads the directory and writes f32 logits on a chat prompt.

usage: make_gguf_golden.py GGUF_FILE CONVERTED_DIR OUT.safetensors
"""

import sys

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import load_file
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaForCausalLM


def permute(w, n_head):
    # convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def field(reader, key):
    f = reader.fields[key]
    return f.parts[f.data[0]][0]


def main():
    gguf_path, converted, out = sys.argv[1:4]
    reader = GGUFReader(gguf_path)
    n_head = int(field(reader, "llama.attention.head_count"))
    n_kv = int(field(reader, "llama.attention.head_count_kv"))
    ours = load_file(f"{converted}/model.safetensors")
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    layer = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    worst = 0.0
    for t in reader.tensors:
        if t.name in names:
            hf = names[t.name]
        else:
            _, i, kind, suffix = t.name.split(".")
            hf = f"model.layers.{i}.{layer[kind]}.{suffix}"
        ref = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(ours[hf].shape)
        mine = ours[hf]
        if t.name.endswith("attn_q.weight"):
            mine = permute(mine, n_head)
        elif t.name.endswith("attn_k.weight"):
            mine = permute(mine, n_kv)
        diff = float(np.abs(mine - ref).max())
        worst = max(worst, diff)
        assert diff <= 1e-6, f"{t.name}: {diff}"
    assert len(ours) == len(reader.tensors), (len(ours), len(reader.tensors))
    print(f"{len(ours)} tensors match gguf's dequantisation (max diff {worst:.1e})")

    tok = AutoTokenizer.from_pretrained(converted)
    model = LlamaForCausalLM.from_pretrained(converted, torch_dtype=torch.float32, attn_implementation="eager").eval()
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
        greedy = model.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:]
    print("transformers greedy:", repr(tok.decode(greedy)))
    save_file({"input_ids": ids.contiguous(), "attention_mask": torch.ones_like(ids),
               "logits": logits.contiguous(), "greedy": greedy.contiguous()}, out)


if __name__ == "__main__":
    main()

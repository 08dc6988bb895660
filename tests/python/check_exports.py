"""Checks modpo's exports with the reference tools: each PEFT adapter loaded with `peft` onto
the base model, and each merged model loaded with `transformers` alone, must reproduce the
logits modpo computed for the same weight vector.

Usage: python check_exports.py BASE_MODEL_DIR OURS.safetensors KIND=DIR [KIND=DIR ...]
where OURS holds input_ids, attention_mask and one `logits_<i>` per export, in order, and KIND
is `peft` or `merged`. Prints one line per export; exits 1 if any differs by more than 1e-4.
"""

import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

TOLERANCE = 1e-4


def main():
    base_dir, ours_path, exports = sys.argv[1], sys.argv[2], sys.argv[3:]
    ours = load_file(ours_path)
    input_ids, attention_mask = ours["input_ids"], ours["attention_mask"]
    token_mask = attention_mask.unsqueeze(-1).float()
    worst = 0.0
    for index, spec in enumerate(exports):
        kind, directory = spec.split("=", 1)
        if kind == "peft":
            base = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
            model = PeftModel.from_pretrained(base, directory)
        elif kind == "merged":
            model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager")
        else:
            raise SystemExit(f"unknown export kind {kind!r}")
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        diff = ((logits - ours[f"logits_{index}"]).abs() * token_mask).max().item()
        worst = max(worst, diff)
        print(f"{kind} {directory}: max abs logits diff {diff:.3e}")
    sys.exit(0 if worst <= TOLERANCE else 1)


if __name__ == "__main__":
    main()

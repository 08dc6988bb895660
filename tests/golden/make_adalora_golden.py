"""Golden outputs of PEFT's AdaLoRA (the reference implementation) for the Rust AdaLoRA tests.

Wraps the tiny untied Llama 3 written by make_model_golden.py in PEFT's AdaLoRA and gives every
singular value a random non-zero start (PEFT starts them at zero, which would make a forward
check trivial). For a fixed right-padded batch it records the logits, the causal LM loss, the
orthogonal penalty and every adapter gradient; then it runs T AdamW steps of PEFT's documented
training loop and records per step the parameters and gradients after `optimizer.step`, and the
rank allocator's importance averages, triplet scores, budget and surviving triplets after
`update_and_allocate`. Writes `OUT_DIR/adalora/golden.safetensors` and `meta.json`.

Adapter tensors carry the Rust model's names: `{module}.shared_a` (PEFT lora_A, [r, in]),
`{module}.shared_e` (lora_E flattened to [r]) and `{module}.shared_b` (lora_B, [out, r]), where
`{module}` is the Hugging Face module path, e.g. `model.layers.0.self_attn.q_proj`.

Usage: python make_adalora_golden.py OUT_DIR  (after make_model_golden.py OUT_DIR)
"""

import json
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import AdaLoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

MODEL = "models/llama3_untied_sharded"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# T = 6 with tinit = tfinal = 0: no masking at step 0, then the cubic schedule lowers the budget
# at every step 1..5 (168 -> 144 -> 128 -> 119 -> 114 -> 112 triplets).
HPARAMS = dict(T=6, init_r=12, target_r=8, lora_alpha=512, lora_dropout=0.0, orth_reg_weight=0.5,
               tinit=0, tfinal=0, deltaT=1, beta1=0.85, beta2=0.85)
LR = 1e-3
LAMBDA_STD = 0.1  # moves the logits by O(1) at scale alpha / r = 512 / 12
SEQ = 10
LENGTHS = [10, 7, 4]  # right padding with PAD
PAD = 0
# lora_A / lora_B; batch and lambda. Picked so that no masking threshold is a near tie (MIN_GAP):
# seeds (0, 7) put two triplet scores 5e-5 apart at one threshold, which float noise could flip.
ADAPTER_SEED, BATCH_SEED = 0, 11
MIN_GAP = 1e-2  # smallest relative gap between the last masked and the first kept triplet score
ADAPTER_NAME = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([ABE])\.default$")


def rust_name(peft_name):
    """`base_model.model.X.lora_A.default` (or the allocator's `X.lora_A.default`) -> `X.shared_a`."""
    module, kind = ADAPTER_NAME.match(peft_name).groups()
    return f"{module}.shared_{kind.lower()}"


def adapters(peft_model):
    return [(n, p) for n, p in peft_model.named_parameters() if ADAPTER_NAME.match(n)]


def snapshot(prefix, named, out, grad=False):
    """Store tensors (or their gradients) under Rust names; lora_E [r, 1] becomes [r]."""
    for name, tensor in named:
        value = (tensor.grad if grad else tensor).detach().float().clone()
        out[f"{prefix}.{rust_name(name)}"] = value.flatten() if ".lora_E." in name else value


def golden_batch(generator, vocab):
    input_ids = torch.randint(1, vocab, (len(LENGTHS), SEQ), generator=generator)
    attention_mask = torch.zeros(len(LENGTHS), SEQ, dtype=torch.int64)
    for row, length in enumerate(LENGTHS):
        attention_mask[row, :length] = 1
        input_ids[row, length:] = PAD
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return input_ids, attention_mask, labels


def causal_lm_loss(logits, labels):
    """transformers' loss: predict token t+1 from position t, mean over non-ignored labels."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())


def orth_penalty(peft_model):
    """orth_reg_weight * mean of ||A A^T - I||_F and ||B^T B - I||_F over all adapters."""
    norms = []
    for name, p in adapters(peft_model):
        if ".lora_E." not in name:
            cov = p @ p.T if ".lora_A." in name else p.T @ p
            norms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0]), ord="fro"))
    return HPARAMS["orth_reg_weight"] * torch.stack(norms).mean()


def build(model_dir):
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"  # plain math is the reference
    ).eval()
    assert model.config._attn_implementation == "eager"
    hparams = {k: v for k, v in HPARAMS.items() if k != "T"}
    # Without a task type get_peft_model returns a plain PeftModel, whose forward calls the
    # transformers model directly and skips AdaLoraModel.forward, i.e. the orthogonal penalty.
    config = AdaLoraConfig(
        **hparams, total_step=HPARAMS["T"], target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    torch.manual_seed(ADAPTER_SEED)  # PEFT draws lora_A / lora_B from the global generator
    peft_model = get_peft_model(model, config)
    assert type(peft_model).__name__ == "PeftModelForCausalLM"
    return model, peft_model


def randomize_lambda(peft_model, generator):
    with torch.no_grad():
        for name, p in adapters(peft_model):
            if ".lora_E." in name:
                p.copy_(LAMBDA_STD * torch.randn(p.shape, generator=generator))


def triplet_scores(allocator, module):
    """PEFT's triplet importance s(E) + mean_in s(A) + mean_out s(B), s = exp_avg_ipt * exp_avg_unc."""
    score = {k: allocator._element_score(f"{module}.lora_{k}.default") for k in "AEB"}
    return score["E"].flatten() + score["A"].mean(dim=1) + score["B"].mean(dim=0)


def record_allocation(prefix, peft_model, budget, masked, out):
    """Store the importance averages and, per module, scores, lambda and kept mask; return kept."""
    allocator = peft_model.base_model.rankallocator
    rank_pattern = peft_model.peft_config["default"].rank_pattern
    snapshot(f"{prefix}.exp_avg_ipt", allocator.exp_avg_ipt.items(), out)
    snapshot(f"{prefix}.exp_avg_unc", allocator.exp_avg_unc.items(), out)
    modules = [ADAPTER_NAME.match(n).group(1) for n, _ in adapters(peft_model) if ".lora_E." in n]
    scores = torch.stack([triplet_scores(allocator, m) for m in modules])
    ranked, cut = scores.flatten().sort().values, allocator.init_bgt - budget
    kept_total = 0
    for module, score in zip(modules, scores):
        lam = peft_model.get_parameter(f"base_model.model.{module}.lora_E.default")
        lam = lam.detach().flatten().clone()
        kept = torch.ones(lam.shape[0])
        if masked:
            kept = torch.tensor(rank_pattern[f"{module}.lora_E.default"], dtype=torch.float32)
            # PEFT masks every score <= the k-th smallest, k = init_bgt - budget
            assert torch.equal(kept.bool(), score > ranked[cut - 1]), f"score rule: {module}"
        assert torch.all(lam[kept == 0] == 0), "masked triplets must have lambda 0"
        out[f"{prefix}.score.{module}"] = score.clone()
        out[f"{prefix}.lambda.{module}"] = lam
        out[f"{prefix}.kept.{module}"] = kept
        kept_total += int(kept.sum())
    gap = ((ranked[cut] - ranked[cut - 1]) / ranked[cut]).item() if masked else float("inf")
    assert gap > MIN_GAP, f"{prefix}: scores at the threshold differ by only {gap:.2e}"
    out[f"{prefix}.budget"] = torch.tensor(budget, dtype=torch.int64)
    out[f"{prefix}.masked"] = torch.tensor(int(masked), dtype=torch.int64)
    return kept_total, gap


def train_trace(peft_model, batch, out):
    """PEFT's documented loop; records every step after optimizer.step and after the allocator."""
    input_ids, attention_mask, labels = batch
    lora, lora_config = peft_model.base_model, peft_model.peft_config["default"]
    params = [p for p in peft_model.parameters() if p.requires_grad]
    assert len(params) == len(adapters(peft_model))
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    out["init_bgt"] = torch.tensor(lora.rankallocator.init_bgt, dtype=torch.int64)
    out["target_bgt"] = torch.tensor(lora.rankallocator.target_bgt, dtype=torch.int64)
    for step in range(HPARAMS["T"]):
        loss = peft_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        out[f"step{step}.loss"] = loss.detach().clone()
        snapshot(f"step{step}.param", adapters(peft_model), out)
        snapshot(f"step{step}.grad", adapters(peft_model), out, grad=True)
        # Cleared so that a pattern left over from an earlier step is not mistaken for this one's.
        lora_config.rank_pattern = None
        lora.update_and_allocate(step)
        budget, mask_ind = lora.rankallocator.budget_schedule(step)
        masked = lora_config.rank_pattern is not None
        assert masked == mask_ind
        kept, gap = record_allocation(f"step{step}", peft_model, budget, masked, out)
        print(f"step {step}: loss={loss.item():.5f} budget={budget} masked={masked} kept={kept}"
              + (f" (relative score gap at the threshold {gap:.1e})" if masked else ""))
        optimizer.zero_grad()
    assert kept <= budget and kept < lora.rankallocator.init_bgt
    # step 0 re-ran the forward of the `grad.` tensors with the same parameters and batch
    grads = {k.removeprefix("step0."): v for k, v in out.items() if k.startswith("step0.grad.")}
    assert all(torch.equal(v, out[k]) for k, v in grads.items())


def main():
    out_dir = Path(sys.argv[1])
    model, peft_model = build(out_dir / MODEL)
    generator = torch.Generator().manual_seed(BATCH_SEED)
    batch = golden_batch(generator, model.config.vocab_size)
    input_ids, attention_mask, labels = batch
    with torch.no_grad(), peft_model.disable_adapter():
        base_logits = peft_model(input_ids=input_ids, attention_mask=attention_mask).logits
    randomize_lambda(peft_model, generator)

    tensors = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    snapshot("init", adapters(peft_model), tensors)
    out = peft_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    ce_loss = causal_lm_loss(out.logits, labels)
    penalty = orth_penalty(peft_model)
    assert torch.allclose(out.loss - ce_loss, penalty, rtol=0, atol=1e-6), (out.loss, ce_loss)
    out.loss.backward()
    snapshot("grad", adapters(peft_model), tensors, grad=True)
    tensors.update(logits=out.logits.detach().float(), ce_loss=ce_loss.detach(),
                   orth_penalty=(out.loss - ce_loss).detach(), loss=out.loss.detach())
    peft_model.zero_grad()
    logit_change = (out.logits - base_logits).abs().max().item()
    assert 0.05 < logit_change < 20, logit_change
    print(f"max |logit change| from adapters: {logit_change:.4f}")
    print(f"loss={out.loss.item():.6f} ce_loss={ce_loss.item():.6f} orth_penalty={penalty.item():.6f}")

    train_trace(peft_model, batch, tensors)

    target = out_dir / "adalora"
    target.mkdir(parents=True, exist_ok=True)
    meta = {**HPARAMS, "lr": LR, "weight_decay": 0.0, "adam_betas": [0.9, 0.999], "adam_eps": 1e-8,
            "lambda_std": LAMBDA_STD, "scaling": "lora_alpha / (ranknum + 1e-5), ranknum = init_r",
            "modules": TARGETS}
    # One metadata entry: safetensors writes the metadata map in random order, so several entries
    # would make the file bytes differ from run to run.
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(target / "golden.safetensors"),
              metadata={"meta": json.dumps(meta)})
    (target / "meta.json").write_text(json.dumps(meta, indent=2))
    print(f"wrote {len(tensors)} tensors to {target / 'golden.safetensors'}")


if __name__ == "__main__":
    main()

"""Baseline: a straightforward PyTorch + PEFT port of one curriculum stage-3 step, on CPU.

This is what a user porting the paper would write: k+1 LoRA adapters ("shared" and
"dim_0".."dim_{k-1}") in PEFT on one model, the reference recomputed every step with the
adapters disabled, then k per-dimension DPO passes and one drawn pass, each its own pair of
forwards (a rows, then b rows) and its own backward. `modpo-trainer bench`
(trainer/src/bench/python.rs) spawns it with the venv's Python to set beside curriculum
stage 3:

    python bench/naive_stage3.py --model DIR --steps-file FILE --warmup N --steps N \
        --threads N --rank R --alpha A --beta BETA --lr LR --name NAME

`--steps-file` is JSONL, one optimizer step a line: {"pairs": [{"prompt_ids", "a_ids",
"b_ids", "preferences": [k of -1/0/1]}, ...], "weights": [[k simplex weights] per pair]}.
The lines are cycled if there are fewer than warmup + steps.

The last stdout line is one JSON object: name, ms_per_step (timed steps only),
pairs_per_step, policy_tokens_per_step (non-pad a+b tokens times the k+1 policy passes),
peak_rss_bytes, versions.
"""

import json
import time

# First: it sets the offline switch before anything from Hugging Face is imported.
from baseline_common import lora_config, parser, peak_rss_bytes, read_jsonl

import peft  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

PAD_ID = 258


def parse_args():
    p = parser(__doc__)
    p.add_argument("--steps-file", required=True, help="JSONL, one optimizer step a line")
    args = p.parse_args()
    if args.steps < 1 or args.warmup < 0:
        p.error("need --steps >= 1 and --warmup >= 0")
    return args


def is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_step(row, k):
    """What is wrong with one parsed line (None if nothing); `k` is the dimension count so far."""
    if not isinstance(row, dict):
        return "expected a JSON object"
    pairs, weights = row.get("pairs"), row.get("weights")
    if not isinstance(pairs, list) or not pairs:
        return "'pairs' must be a non-empty list"
    if not isinstance(weights, list) or len(weights) != len(pairs):
        return "'weights' must be a list with one entry per pair"
    for j, pair in enumerate(pairs):
        if not isinstance(pair, dict):
            return f"pair {j} is not an object"
        for key in ("prompt_ids", "a_ids", "b_ids"):
            ids = pair.get(key)
            if not isinstance(ids, list) or not all(is_int(t) and t >= 0 for t in ids):
                return f"pair {j}: {key!r} must be a list of token ids"
        if not pair["prompt_ids"] or not pair["a_ids"] or not pair["b_ids"]:
            return f"pair {j}: empty prompt or response"
        prefs = pair.get("preferences")
        if not isinstance(prefs, list) or not prefs or not all(is_number(s) and s in (-1, 0, 1) for s in prefs):
            return f"pair {j}: 'preferences' must be a non-empty list of -1/0/1"
        if len(prefs) != k:
            return f"pair {j}: {len(prefs)} preferences, expected {k}"
        w = weights[j]
        if not isinstance(w, list) or len(w) != k or not all(is_number(x) for x in w):
            return f"weights of pair {j}: expected {k} numbers"
    return None


def read_steps(path):
    """The steps of `path`, each checked; k (the dimension count) is the first pair's."""
    k = None

    def check(row):
        nonlocal k
        if k is None and isinstance(row, dict) and isinstance(row.get("pairs"), list) and row["pairs"]:
            first = row["pairs"][0]
            k = len(first.get("preferences") or []) if isinstance(first, dict) else 0
        return check_step(row, k)

    steps = read_jsonl(path, check, "steps")
    return steps, k


def padded_rows(pairs, response_key):
    """prompt+response rows, right-padded: input ids, attention mask, and a mask of the positions
    whose *next* token is a response token (position t-1 predicts token t)."""
    rows = [p["prompt_ids"] + p[response_key] for p in pairs]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    predicts_response = torch.zeros((len(rows), width - 1))
    for i, (pair, row) in enumerate(zip(pairs, rows)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        predicts_response[i, len(pair["prompt_ids"]) - 1 : len(row) - 1] = 1
    return input_ids, attention_mask, predicts_response


def seq_logp(model, rows):
    """Sum of the response tokens' log-probabilities, one per row."""
    input_ids, attention_mask, predicts_response = rows
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logp = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (token_logp * predicts_response).sum(-1)


class Stage3:
    def __init__(self, model, k, rank, alpha, beta):
        self.model = model
        self.k = k
        self.beta = beta
        self.scaling = alpha / rank
        self.lora_layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
        self.lora_params = [p for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n]

    def activate(self, adapters):
        self.model.base_model.set_adapter(adapters)
        # set_adapter freezes the adapters it leaves out; all of them are being trained.
        for p in self.lora_params:
            p.requires_grad_(True)

    def step(self, row):
        """Forwards and backwards of one optimizer step (the caller steps the optimizer)."""
        pairs = row["pairs"]
        a_rows = padded_rows(pairs, "a_ids")
        b_rows = padded_rows(pairs, "b_ids")
        prefs = torch.tensor([p["preferences"] for p in pairs], dtype=torch.float32)
        weights = torch.tensor(row["weights"], dtype=torch.float32)

        # 1. Reference: the base model, recomputed every step.
        with torch.no_grad(), self.model.disable_adapter():
            ref_a = seq_logp(self.model, a_rows)
            ref_b = seq_logp(self.model, b_rows)

        # 2. One DPO pass per dimension, on shared + dim_i.
        margins = []
        for i in range(self.k):
            self.activate(["shared", f"dim_{i}"])
            m = (seq_logp(self.model, a_rows) - ref_a) - (seq_logp(self.model, b_rows) - ref_b)
            s = prefs[:, i]
            loss = (-F.logsigmoid(self.beta * s * m) * s.abs()).sum() / max(1, int((s != 0).sum()))
            loss.backward()
            margins.append(m.detach())

        # 3. The drawn pass: every adapter on, dim_i scaled per row by that pair's weight w_i.
        # PEFT's LoRA Linear.forward computes `lora_B(lora_A(x)) * self.scaling[name]` on the
        # [rows, seq, out] output, so a [rows, 1, 1] tensor in place of the float scales each
        # row by its own weight (checked against one-row-at-a-time forwards in peft 0.21.2).
        self.activate(["shared"] + [f"dim_{i}" for i in range(self.k)])
        per_row = weights.view(len(pairs), self.k, 1, 1) * self.scaling
        for layer in self.lora_layers:
            for i in range(self.k):
                layer.scaling[f"dim_{i}"] = per_row[:, i]
        m = (seq_logp(self.model, a_rows) - ref_a) - (seq_logp(self.model, b_rows) - ref_b)
        t = self.beta * (weights * torch.stack(margins, dim=1)).sum(-1)
        z = self.beta * m
        # KL(Bernoulli(sigmoid(t)) || Bernoulli(sigmoid(z))), the teacher t fixed.
        kl = torch.sigmoid(t) * (F.logsigmoid(t) - F.logsigmoid(z)) + torch.sigmoid(-t) * (
            F.logsigmoid(-t) - F.logsigmoid(-z)
        )
        kl.mean().backward()
        for layer in self.lora_layers:
            for i in range(self.k):
                layer.scaling[f"dim_{i}"] = self.scaling

        # Non-pad tokens through the policy: the a and b rows, once per policy pass.
        return (int(a_rows[1].sum()) + int(b_rows[1].sum())) * (self.k + 1)


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    steps, k = read_steps(args.steps_file)

    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    lora = lora_config(args)
    model = peft.get_peft_model(model, lora, adapter_name="shared")
    for i in range(k):
        model.add_adapter(f"dim_{i}", lora)
    model.train()
    stage3 = Stage3(model, k, args.rank, args.alpha, args.beta)
    optimizer = torch.optim.AdamW(stage3.lora_params, lr=args.lr, weight_decay=0.0)

    step_ms, step_tokens = [], []
    for n in range(args.warmup + args.steps):
        row = steps[n % len(steps)]
        start = time.perf_counter()
        tokens = stage3.step(row)
        optimizer.step()
        optimizer.zero_grad()
        step_ms.append((time.perf_counter() - start) * 1e3)
        step_tokens.append(tokens)

    timed_tokens = step_tokens[args.warmup :]
    timed_pairs = [len(steps[n % len(steps)]["pairs"]) for n in range(args.warmup, args.warmup + args.steps)]
    result = {
        "name": args.name,
        "ms_per_step": step_ms[args.warmup :],
        "pairs_per_step": sum(timed_pairs) / len(timed_pairs),
        "policy_tokens_per_step": sum(timed_tokens) / len(timed_tokens),
        "peak_rss_bytes": peak_rss_bytes(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

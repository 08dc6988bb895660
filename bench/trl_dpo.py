"""Baseline: TRL's DPOTrainer with a PEFT LoRA adapter, single-objective DPO, on CPU.

Measures the wall time of each optimizer step of `trl.DPOTrainer` on the benchmark's own
model and preference pairs, so that `modpo-trainer bench` (trainer/src/bench/python.rs) can
set it beside curriculum stage 1. It spawns this script with the venv's Python:

    python bench/trl_dpo.py --model DIR --pairs FILE --batch B --warmup N --steps N \
        --threads N --rank R --alpha A --beta BETA --lr LR --max-length L [--precompute-ref] \
        --name NAME

`--pairs` is JSONL, one pair a line: {"prompt", "chosen", "rejected", "tokens"}, in the order
the Rust side batches them (TRL is told to sample sequentially so it sees the same batches).
Without `--precompute-ref` TRL recomputes the reference every step by disabling the adapter;
with it the reference log-probs are computed once before training (counted in setup_seconds).

The last stdout line is one JSON object: name, ms_per_step (timed steps only),
pairs_per_step, policy_tokens_per_step (non-pad tokens of the chosen and rejected rows),
peak_rss_bytes, setup_seconds (model load, tokenisation, reference precompute), versions.
The Trainer prints its own summary dict to stdout before it; diagnostics go to stderr.
"""

import json
import os
import sys
import tempfile
import time

# First: it sets the offline switches before anything from Hugging Face is imported.
from baseline_common import fail, lora_config, parser, peak_rss_bytes, read_jsonl

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import datasets  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402


def parse_args():
    p = parser(__doc__)
    p.add_argument("--pairs", required=True, help="JSONL of {prompt, chosen, rejected, tokens}")
    p.add_argument("--batch", type=int, required=True, help="pairs per optimizer step")
    p.add_argument("--max-length", type=int, required=True)
    p.add_argument("--precompute-ref", action="store_true")
    args = p.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        p.error("need --steps >= 1, --warmup >= 0, --batch >= 1")
    return args


def check_pair(row):
    """What is wrong with one parsed line of `--pairs` (None if nothing)."""
    if not isinstance(row, dict):
        return "expected a JSON object"
    for key in ("prompt", "chosen", "rejected"):
        if not isinstance(row.get(key), str):
            return f"{key!r} must be a string"
    if not isinstance(row.get("tokens"), int) or isinstance(row["tokens"], bool):
        return "'tokens' must be an integer"
    return None


class CountingCollator:
    """Wraps TRL's collator to record the pairs and non-padding tokens of every batch it builds,
    in order (a batch's rows are its pairs' chosen rows, then their rejected rows)."""

    def __init__(self, collator):
        self.collator = collator
        self.pairs = []
        self.tokens = []

    def __call__(self, examples):
        batch = self.collator(examples)
        self.pairs.append(len(examples))
        self.tokens.append(int(batch["attention_mask"].sum()))
        return batch


class StepTimer(transformers.TrainerCallback):
    """Times each optimizer step as the span between consecutive `on_step_end`s.

    The Trainer fetches and collates a step's batch before `on_step_begin`, so begin-to-end
    would miss the data work; end-to-end covers collation, forward (policy and reference),
    backward, clipping, optimizer and scheduler. The first step runs from `on_train_begin`.
    """

    def __init__(self):
        self.train_begin = None
        self.ends = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.train_begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def step_ms(self):
        marks = [self.train_begin] + self.ends
        return [(b - a) * 1e3 for a, b in zip(marks, marks[1:])]


def check_token_counts(dataset, pairs):
    """Compares TRL's tokenisation with the Rust side's `tokens` counts (on stderr)."""
    if len(dataset) != len(pairs):
        print(
            f"token check: TRL kept {len(dataset)} of {len(pairs)} pairs (prompt >= max_length dropped)",
            file=sys.stderr,
        )
        return
    diffs = []
    for row, pair in zip(dataset, pairs):
        ours = 2 * len(row["prompt_ids"]) + len(row["chosen_ids"]) + len(row["rejected_ids"])
        diffs.append(ours - pair["tokens"])
    mismatched = sum(d != 0 for d in diffs)
    print(
        f"token check: TRL tokens - ours per pair: {mismatched}/{len(diffs)} differ, "
        f"min {min(diffs)}, max {max(diffs)}, total {sum(diffs)} "
        f"(of {sum(p['tokens'] for p in pairs)})",
        file=sys.stderr,
    )


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pairs = read_jsonl(args.pairs, check_pair, "pairs")

    setup_start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    train_dataset = datasets.Dataset.from_list(
        [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]
    )
    lora = lora_config(args)
    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="trl_dpo_") as output_dir:
        config = trl.DPOConfig(
            output_dir=output_dir,
            per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=1,
            max_steps=args.warmup + args.steps,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            beta=args.beta,
            max_length=args.max_length,
            precompute_ref_log_probs=args.precompute_ref,
            # Same batches as the Rust side wrote, in its order.
            train_sampling_strategy="sequential",
            logging_strategy="no",
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=True,
            bf16=False,
            fp16=False,
            # TRL turns gradient checkpointing on by default (`activation_checkpointing` is its
            # non-deprecated name in transformers 5).
            activation_checkpointing=False,
            dataloader_num_workers=0,
            seed=0,
            data_seed=0,
        )
        trainer = trl.DPOTrainer(
            model=model,
            ref_model=None,
            args=config,
            train_dataset=train_dataset,
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[timer],
        )
        check_token_counts(trainer.train_dataset, pairs)
        # Installed after construction so the reference precompute's batches are not counted.
        counter = CountingCollator(trainer.data_collator)
        trainer.data_collator = counter
        trainer.train()
    setup_seconds = timer.train_begin - setup_start

    step_ms = timer.step_ms()
    if len(step_ms) != args.warmup + args.steps:
        fail(f"expected {args.warmup + args.steps} optimizer steps, the Trainer ran {len(step_ms)}")
    timed = slice(args.warmup, args.warmup + args.steps)
    timed_pairs, timed_tokens = counter.pairs[timed], counter.tokens[timed]
    result = {
        "name": args.name,
        "ms_per_step": step_ms[args.warmup :],
        "pairs_per_step": sum(timed_pairs) / len(timed_pairs),
        "policy_tokens_per_step": sum(timed_tokens) / len(timed_tokens),
        "peak_rss_bytes": peak_rss_bytes(),
        "setup_seconds": setup_seconds,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "peft": peft.__version__,
        },
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

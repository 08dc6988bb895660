"""What the two baselines share (bench/trl_dpo.py, bench/naive_stage3.py): offline loading,
the LoRA setup, the command-line options `modpo-trainer bench` passes to both
(trainer/src/bench/python.rs), checked JSONL input and the peak memory they report.
"""

import argparse
import json
import os
import resource
import sys

# Everything loads from local directories; never wait on the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parser(doc):
    """An argument parser with the options common to both baselines."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face Llama directory")
    p.add_argument("--warmup", type=int, required=True, help="untimed steps first")
    p.add_argument("--steps", type=int, required=True, help="timed steps after warmup")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--alpha", type=float, required=True)
    p.add_argument("--beta", type=float, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--name", required=True)
    return p


def fail(message):
    """Exits with `message`, prefixed by the script's name."""
    sys.exit(f"{os.path.basename(sys.argv[0])}: {message}")


def read_jsonl(path, check, what):
    """The rows of `path`, each checked by `check(row)` (a message if it is wrong, else None),
    so a bad line names itself rather than failing mid-run; `what` names the rows in the error
    for an empty file."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{path}:{lineno}: not JSON: {e}")
            problem = check(row)
            if problem:
                fail(f"{path}:{lineno}: {problem}")
            rows.append(row)
    if not rows:
        fail(f"{path}: no {what}")
    return rows


def lora_config(args):
    """LoRA of rank `--rank` and alpha `--alpha` on all seven projections, no dropout."""
    return peft.LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=0.0,
        target_modules=TARGET_MODULES,
        task_type="CAUSAL_LM",
    )


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

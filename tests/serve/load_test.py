"""A bounded load test of `modpo-trainer serve` on 127.0.0.1: N clients, each with its own
prompt, random preference weights and a random answer length between T/2 and T (seeded, so
rows free up at different steps and waiting requests join a running batch), first one at a
time, then all at once.

Checks that nothing is dropped or mixed up (every concurrent answer equals the same request's
answer alone, greedy, token for token) and prints the throughput of both in new tokens per
second. Figures only: it asserts nothing about speed.

Usage: load_test.py BASE_URL MODEL_NAME [--clients N] [--max-tokens T] [--seed S] [--json OUT]
"""

import argparse
import json
import random
import threading
import time
import urllib.request

parser = argparse.ArgumentParser()
parser.add_argument("base")
parser.add_argument("model")
parser.add_argument("--clients", type=int, default=8)
parser.add_argument("--max-tokens", type=int, default=32)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--timeout", type=float, default=300.0, help="seconds for each request")
parser.add_argument("--json", help="write the figures here")
args = parser.parse_args()
assert args.base.startswith("http://127.0.0.1:"), "the load test runs against 127.0.0.1 only"


def get(path):
    with urllib.request.urlopen(f"{args.base}{path}", timeout=args.timeout) as response:
        return json.load(response)


def complete(request):
    """One chat completion, greedy: (text, new tokens)."""
    data = json.dumps(request).encode()
    http = urllib.request.Request(
        f"{args.base}/v1/chat/completions", data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(http, timeout=args.timeout) as response:
        body = json.load(response)
    return body["choices"][0]["message"]["content"], body["usage"]["completion_tokens"]


dims = len(get("/v1/models")["data"][0]["preference_dimensions"])
rng = random.Random(args.seed)


def random_weights():
    """A uniform point of the simplex: sorted uniforms' gaps."""
    cuts = sorted(rng.random() for _ in range(dims - 1))
    w = [b - a for a, b in zip([0.0] + cuts, cuts + [1.0])]
    w[-1] = 1.0 - sum(w[:-1])
    return w


requests = []
for i in range(args.clients):
    request = {
        "model": args.model,
        "messages": [{"role": "user", "content": f"Request {i}: say something about the number {i * 7}."}],
        "max_tokens": rng.randint(max(1, args.max_tokens // 2), args.max_tokens),
        "temperature": 0,
    }
    if dims:
        request["preference_weights"] = random_weights()
    requests.append(request)

start = time.monotonic()
alone = [complete(r) for r in requests]
alone_seconds = time.monotonic() - start
alone_tokens = sum(t for _, t in alone)

before = get("/health")
together = [None] * len(requests)
errors = []


def client(i):
    try:
        together[i] = complete(requests[i])
    except Exception as e:  # noqa: BLE001 - reported below as a dropped request
        errors.append((i, repr(e)))


threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
start = time.monotonic()
for t in threads:
    t.start()
for t in threads:
    t.join()
together_seconds = time.monotonic() - start
after = get("/health")

assert not errors, f"dropped requests: {errors}"
mixed = [i for i, (a, b) in enumerate(zip(alone, together)) if a != b]
assert not mixed, f"answers that differ from their solo answer: {mixed}"
together_tokens = sum(t for _, t in together)
steps = after["decode_steps"] - before["decode_steps"]
rows = after["decoded_rows"] - before["decoded_rows"]
figures = {
    "clients": args.clients,
    "max_tokens": args.max_tokens,
    "one_at_a_time": {"seconds": round(alone_seconds, 3), "tokens": alone_tokens,
                      "tokens_per_second": round(alone_tokens / alone_seconds, 1)},
    "concurrent": {"seconds": round(together_seconds, 3), "tokens": together_tokens,
                   "tokens_per_second": round(together_tokens / together_seconds, 1),
                   "decode_steps": steps, "mean_rows_per_step": round(rows / max(steps, 1), 2)},
}
figures["speedup"] = round(
    figures["concurrent"]["tokens_per_second"] / figures["one_at_a_time"]["tokens_per_second"], 2
)
print(json.dumps(figures, indent=1))
print(f"all {args.clients} concurrent answers equal their solo answers")
if args.json:
    with open(args.json, "w") as f:
        json.dump(figures, f, indent=1)

"""`modpo-trainer serve` through the official `openai` client: response shapes, streaming, the
error cases, and two requests at different preference weights decoded in one batch giving
the tokens each gives alone (greedy).

Usage: openai_client.py BASE_URL MODEL_NAME (the server runs a run with two dimensions).
Exits non-zero with the failing assertion.
"""

import json
import sys
import threading
import time
import urllib.request

import openai

BASE, MODEL = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0)
PROMPT = [{"role": "user", "content": "Write one polite sentence."}]


def get(path):
    with urllib.request.urlopen(f"{BASE}{path}") as response:
        return json.load(response)


def chat(w, max_tokens=40, **extra):
    return client.chat.completions.create(
        model=MODEL,
        messages=PROMPT,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"preference_weights": w},
        **extra,
    )


def check_models_and_health():
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL], models
    listed = get("/v1/models")["data"][0]
    assert listed["preference_dimensions"] == ["polite", "formal"], listed
    assert abs(sum(listed["default_preference_weights"]) - 1) < 1e-9, listed
    assert get("/health")["status"] == "ok"


def check_chat_shape():
    r = chat([0.3, 0.7], max_tokens=12)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-"), r
    assert r.model == MODEL and len(r.choices) == 1, r
    c = r.choices[0]
    assert c.index == 0 and c.message.role == "assistant", c
    assert isinstance(c.message.content, str) and c.message.content, c
    assert c.finish_reason in ("length", "stop"), c
    u = r.usage
    assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 12, u
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens, u
    assert r.model_extra["preference_weights"] == [0.3, 0.7], r.model_extra
    # n choices: greedy ones are equal.
    r = chat([0.3, 0.7], max_tokens=6, n=2)
    assert [c.index for c in r.choices] == [0, 1], r
    assert r.choices[0].message.content == r.choices[1].message.content, r
    # Sampling with a seed is reproducible.
    sample = lambda: client.chat.completions.create(
        model=MODEL, messages=PROMPT, max_tokens=10, temperature=1.0, top_p=0.9, seed=7
    ).choices[0].message.content
    assert sample() == sample()


def check_completion_shape():
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-"), r
    assert r.choices[0].text and r.choices[0].finish_reason == "length", r
    assert r.usage.completion_tokens == 8, r.usage


def check_streaming():
    whole = chat([1.0, 0.0], max_tokens=20).choices[0].message.content
    stream = chat([1.0, 0.0], max_tokens=20, stream=True, stream_options={"include_usage": True})
    pieces, finishes, usage, roles = [], [], None, []
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk", chunk
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            roles.append(c.delta.role)
            pieces.append(c.delta.content or "")
            finishes.append(c.finish_reason)
    assert "".join(pieces) == whole, (pieces, whole)
    assert roles[0] == "assistant" and finishes[-1] == "length", (roles, finishes)
    assert len(pieces) > 2, pieces
    assert usage is not None and usage.completion_tokens == 20, usage
    stream = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=8, temperature=0, stream=True
    )
    text = "".join(c.choices[0].text for c in stream)
    whole = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0)
    assert text == whole.choices[0].text, (text, whole)


def check_stop():
    whole = chat([0.5, 0.5], max_tokens=30).choices[0].message.content
    # A stop string from the middle of the greedy answer: the answer ends just before it.
    cut = len(whole) // 2
    stop = whole[cut : cut + 2]
    r = chat([0.5, 0.5], max_tokens=30, stop=[stop])
    expected = whole[: whole.find(stop)]
    assert r.choices[0].message.content == expected, (r.choices[0].message.content, expected)
    assert r.choices[0].finish_reason == "stop", r
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in chat([0.5, 0.5], max_tokens=30, stop=stop, stream=True)
        if c.choices
    )
    assert streamed == expected, (streamed, expected)


def expect_error(status, param, call, fragment):
    try:
        call()
    except openai.APIStatusError as e:
        assert e.status_code == status, (e.status_code, e.body)
        assert e.body["param"] == param, e.body
        assert fragment in e.body["message"], e.body
        assert e.body["type"], e.body
        return
    raise AssertionError(f"expected HTTP {status} about {param}")


def check_errors():
    expect_error(400, "preference_weights", lambda: chat([0.5, 0.6]), "not on the simplex")
    expect_error(400, "preference_weights", lambda: chat([1.0]), "k = 2 dimensions")
    expect_error(400, "preference_weights", lambda: chat([1.5, -0.5]), "non-negative")
    expect_error(400, "preference_weights[0]", lambda: chat(["a", "b"]), "invalid type")
    expect_error(400, "messages", lambda: client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x" * 5000}], max_tokens=1
    ), "context is 4096 tokens")
    expect_error(400, "max_tokens", lambda: chat([0.5, 0.5], max_tokens=5000), "leave")
    expect_error(400, "messages", lambda: client.chat.completions.create(
        model=MODEL, messages=[], max_tokens=1), "empty")
    expect_error(400, "temperature", lambda: client.chat.completions.create(
        model=MODEL, messages=PROMPT, temperature=3), "between 0 and 2")
    expect_error(400, "n", lambda: chat([0.5, 0.5], n=100), "--max-batch")
    expect_error(404, "model", lambda: client.chat.completions.create(
        model="no-such-model", messages=PROMPT), "does not exist")
    # Unknown fields are ignored, as OpenAI ignores them.
    r = client.chat.completions.create(
        model=MODEL, messages=PROMPT, max_tokens=3, extra_body={"frobnicate": {"x": 1}}
    )
    assert r.choices[0].message.content, r


def timed_stream(w, max_tokens, out, key, streaming=None):
    """Streams a greedy answer at `w`, recording its text and when its first and last pieces
    came; sets `streaming` at the first piece."""
    text, first = [], None
    for chunk in chat(w, max_tokens=max_tokens, stream=True):
        for c in chunk.choices:
            if c.delta.content:
                if first is None:
                    first = time.monotonic()
                    if streaming:
                        streaming.set()
                text.append(c.delta.content)
    out[key] = ("".join(text), first, time.monotonic())


def check_two_weights_in_one_batch():
    # A long answer at `a` is decoding when the short one at `b` arrives and joins its batch.
    (a, long), (b, short) = ([0.9, 0.1], 600), ([0.0, 1.0], 48)
    alone_a = chat(a, max_tokens=long).choices[0].message.content
    alone_b = chat(b, max_tokens=short).choices[0].message.content
    assert alone_a[: len(alone_b)] != alone_b, "the two weightings begin alike: no mix-up would show"
    before = get("/health")
    out, streaming = {}, threading.Event()
    first = threading.Thread(target=timed_stream, args=(a, long, out, "a", streaming))
    first.start()
    assert streaming.wait(60), "the first answer did not start"
    second = threading.Thread(target=timed_stream, args=(b, short, out, "b"))
    second.start()
    first.join()
    second.join()
    (text_a, first_a, last_a), (text_b, first_b, last_b) = out["a"], out["b"]
    after = get("/health")
    steps = after["decode_steps"] - before["decode_steps"]
    rows = after["decoded_rows"] - before["decoded_rows"]
    assert first_b < last_a and rows > steps, (
        f"the second answer did not decode beside the first: {rows} rows in {steps} steps, "
        f"b from {first_b} to {last_b}, a until {last_a}"
    )
    assert text_a == alone_a, (text_a, alone_a)
    assert text_b == alone_b, (text_b, alone_b)
    print(f"two weightings in one batch: {rows} rows in {steps} steps, answers equal to alone")


for check in (
    check_models_and_health,
    check_chat_shape,
    check_completion_shape,
    check_streaming,
    check_stop,
    check_errors,
    check_two_weights_in_one_batch,
):
    check()
    print(f"ok {check.__name__}")

"""The limits of `modpo-trainer serve`, against a server started with `--max-batch 1
--max-queue 1 --request-timeout T`: a request beyond the queue gets 503 with a clear message,
a request past its time gets 504 (an error event when streaming), and the next request is
served normally once those are gone.

Usage: limits.py BASE_URL MODEL_NAME
"""

import json
import sys
import threading
import time
import urllib.error
import urllib.request

BASE, MODEL = sys.argv[1], sys.argv[2]


def post(body, path="/v1/chat/completions"):
    """(status, parsed body or SSE text)."""
    request = urllib.request.Request(
        f"{BASE}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            text = response.read().decode()
            return response.status, (text if body.get("stream") else json.loads(text))
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())


def health():
    with urllib.request.urlopen(f"{BASE}/health") as response:
        return json.load(response)


def wait_for(what, condition):
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {health()}"
        time.sleep(0.01)


def request(max_tokens, stream=False):
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


results = {}


def run(name, body):
    results[name] = post(body)


# The one row: a request far longer than the timeout (4000 tokens; the tiny model makes about
# a thousand a second on one core).
long = threading.Thread(target=run, args=("long", request(4000)))
long.start()
wait_for("the long request to hold the row", lambda: health()["running"] == 1)
# The queue's one place.
queued = threading.Thread(target=run, args=("queued", request(4000, stream=True)))
queued.start()
wait_for("the second request to wait", lambda: health()["waiting"] == 1)
status, body = post(request(5))
assert status == 503, (status, body)
error = body["error"]
assert error["code"] == "queue_full" and "--max-queue 1" in error["message"], error
print(f"ok queue full: 503 {error['message']!r}")

long.join()
status, body = results["long"]
assert status == 504, (status, body)
assert body["error"]["code"] == "request_timeout", body
print(f"ok timeout: 504 {body['error']['message']!r}")
queued.join()
status, text = results["queued"]
# The stream started (200) and ended with an error event, without [DONE].
assert status == 200, (status, text)
events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
assert json.loads(events[-1])["error"]["code"] == "request_timeout", events[-3:]
assert "[DONE]" not in events
print("ok timeout while streaming: an error event ends the stream")

# The cancelled requests freed the row: a short request is answered.
wait_for("the row to be free", lambda: health()["running"] == 0 and health()["waiting"] == 0)
status, body = post(request(5))
assert status == 200 and body["usage"]["completion_tokens"] == 5, (status, body)
print("ok served again after the timeouts")

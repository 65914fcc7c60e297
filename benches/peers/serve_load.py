"""A load generator for OpenAI-compatible servers (`tfc serve`, llama.cpp's llama-server):
at each concurrency C, C clients each send the same number of streamed completion
requests one after another; reports aggregate completion tokens/s over the wall time,
and p50/p99 of the time to the first token and of the gaps between tokens (each
streamed chunk that carries text). Standard library only. Prints one JSON object.
"""
import argparse
import http.client
import json
import threading
import time

PROMPTS = [
    "Once upon a time, in a village by the sea,",
    "The three most important ideas in physics are",
    "Here is a recipe for a simple tomato soup:",
    "Write a short letter to a friend about a trip to the mountains.",
    "The history of the printing press begins",
    "A list of reasons to learn a second language:",
    "In the year 2050, cities will",
    "The best way to learn to program is",
]


def one(host, port, prompt, max_tokens):
    """One streamed completion: (first-token latency, gaps between tokens, tokens)."""
    c = http.client.HTTPConnection(host, port, timeout=600)
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    first, last, gaps, tokens = None, None, [], None
    while True:
        line = r.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        data = line[6:]
        if data == b"[DONE]":
            break
        v = json.loads(data)
        if v.get("usage"):
            tokens = v["usage"]["completion_tokens"]
        for ch in v.get("choices", []):
            if ch.get("text"):
                now = time.perf_counter()
                if first is None:
                    first = now - t0
                else:
                    gaps.append(now - last)
                last = now
    c.close()
    return first, gaps, tokens or (len(gaps) + 1)


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))] if v else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args()
    one(a.host, a.port, "Hello", 4)  # warm up
    out = {}
    for conc in [int(x) for x in a.concurrency.split(",")]:
        results, errors = [], []

        def client(i):
            for k in range(a.requests):
                try:
                    results.append(one(a.host, a.port, PROMPTS[(i + k) % len(PROMPTS)], a.max_tokens))
                except Exception as e:  # noqa: BLE001 - reported below
                    errors.append(str(e))

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(conc)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        if errors:
            raise SystemExit(f"concurrency {conc}: {errors[0]}")
        ttft = [r[0] for r in results if r[0] is not None]
        itl = [g for r in results for g in r[1]]
        tokens = sum(r[2] for r in results)
        out[str(conc)] = {
            "tokens_per_s": tokens / wall,
            "tokens": tokens,
            "wall_s": wall,
            "ttft_p50_ms": 1e3 * pct(ttft, 50),
            "ttft_p99_ms": 1e3 * pct(ttft, 99),
            "itl_p50_ms": 1e3 * pct(itl, 50),
            "itl_p99_ms": 1e3 * pct(itl, 99),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()

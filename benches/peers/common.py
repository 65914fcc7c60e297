"""What every peer script shares: the command line, the timing loop and the JSON line."""
import argparse
import json
import statistics
import time


def parser(shapes):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=shapes, default="w1")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    return ap


def prompt(a, vocab):
    """The prompt every engine gets (`tfc bench`'s too)."""
    return [(i * 31) % vocab for i in range(a.prompt)]


def measure(a, prefill, step, reset=lambda: None):
    """One warm-up and `a.runs` measured runs of `reset()` (not timed), `token, state =
    prefill()`, then `a.decode` times `token, state = step(token, state)`, each step fed
    the token the one before chose (greedy). Returns prefill times (ms), decode speeds
    (tok/s) and the tokens of the last run (the prefill's, then each step's)."""
    pre, dec, tokens = [], [], []
    for run in range(a.runs + 1):
        reset()
        t = time.perf_counter()
        tok, state = prefill()
        p = time.perf_counter() - t
        out = [tok]
        t = time.perf_counter()
        for _ in range(a.decode):
            tok, state = step(tok, state)
            out.append(tok)
        d = time.perf_counter() - t
        if run > 0:
            pre.append(p * 1e3)
            dec.append(a.decode / d)
            tokens = out
    return pre, dec, tokens


def report(peer, pre, dec, tokens):
    stats = lambda v: {"median": statistics.median(v), "min": min(v), "max": max(v)}
    print(json.dumps({"peer": peer, "prefill_ms": stats(pre), "decode_tok_s": stats(dec),
                      "tokens": [int(t) for t in tokens]}))

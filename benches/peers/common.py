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


def measure(a, prefill, step, reset=lambda: None):
    """One warm-up and `a.runs` measured runs of `reset()` (not timed), `state = prefill()`,
    then `a.decode` times `state = step(state, i)`; returns prefill times (ms) and decode
    speeds (tok/s)."""
    pre, dec = [], []
    for run in range(a.runs + 1):
        reset()
        t = time.perf_counter()
        state = prefill()
        p = time.perf_counter() - t
        t = time.perf_counter()
        for i in range(a.decode):
            state = step(state, i)
        d = time.perf_counter() - t
        if run > 0:
            pre.append(p * 1e3)
            dec.append(a.decode / d)
    return pre, dec


def report(peer, pre, dec):
    stats = lambda v: {"median": statistics.median(v), "min": min(v), "max": max(v)}
    print(json.dumps({"peer": peer, "prefill_ms": stats(pre), "decode_tok_s": stats(dec)}))

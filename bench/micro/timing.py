"""Timing helpers shared by the microbenchmarks in this folder (each warms up with 2 calls)."""

import statistics
import time


def median_ms(f, calls=6):
    """The median of `calls` timed calls of f, in ms: one call at a time, for calls of tens of ms."""
    for _ in range(2):
        f()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        f()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def best_ms(f, calls=5, repeats=3):
    """The best of `repeats` means over `calls` calls of f, in ms: for calls of about 1 ms."""
    for _ in range(2):
        f()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            f()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e3

"""Helpers shared by the benchmarks (run as scripts: ``python benchmarks/bench_*.py``)."""

import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def peak_bytes(fn: Callable[[], object]) -> tuple[int, object]:
    """Peak of live CPU tensor memory allocated while ``fn`` runs (and its result)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak, result


def matmul_rate(
    m: int = 2048,
    k: int = 576,
    n: int = 1536,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seconds: float = 1.0,
) -> float:
    """The machine's matrix-product rate in FLOP/s, measured now: the best of repeated
    ``[m, k] @ [k, n]`` products (default: SmolLM2's d_model and d_mlp, 2048 rows) over about
    ``seconds``."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best

"""Several processes doing one thing at the same moment: races between processes."""

from __future__ import annotations

import multiprocessing
import time


def _run(target, args, start_at: float, out) -> None:
    time.sleep(max(0.0, start_at - time.time()))
    try:
        out.put(target(*args))
    except Exception as e:  # noqa: BLE001 - the test reports what a process hit
        out.put(f"{type(e).__name__}: {str(e)[:200]}")


def in_processes_at_once(target, args: tuple, n: int, timeout: float = 60) -> list:
    """`target(*args)` in `n` forked processes released together; what each returned (or the
    exception it raised, as text)."""
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    start_at = time.time() + 0.3
    procs = [context.Process(target=_run, args=(target, args, start_at, out)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [out.get(timeout=timeout) for _ in procs]
    for p in procs:
        p.join(timeout)
    return results

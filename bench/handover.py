"""
Task latency during a handover: a steady stream of the sample app's tasks
with no deploy, then the same stream while a new release takes over (the
state's overlap handover: the new generation serves once its workers answer,
the old one stops consuming), in the same process, against the same broker.

A task's latency runs from the moment it is sent to the end of its execution
(the sample app's execution record); the gap is the longest time between two
completed tasks while the handover runs (or, at rest, while the stream does).
"""

import concurrent.futures
import itertools
import math
import time

from bench.env import BenchError
from localfleet.sampleapp import executions

# Tasks per second, and how long each one works.
RATE = 20
WORK = 0.05
# Tasks sent before the handover starts, and after it returned.
LEAD, TAIL = 20, 20


def percentile(values, p):
    """The nearest-rank ``p``-th percentile of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def stream(app, queue, data, count, during=None):
    """
    Send ``count`` tasks to ``queue``, one every 1/RATE s; with ``during``,
    run it in a thread once LEAD tasks are out and, should it outlast the
    stream, send on until it returned and TAIL more. Wait for every result.

    Returns {"latencies": [s, ...], "gap": s, "tasks": n, "window": s}.
    """
    sent = []
    started = returned = None
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = None
        first = time.time()
        n, last = 0, count
        while n < last:
            if during is not None and n == LEAD:
                started, future = time.time(), pool.submit(during)
            if future is not None and returned is None and future.done():
                returned = time.time()
                last = max(last, n + TAIL)
            if future is not None and returned is None and n == last - 1:
                last += 1  # the handover still runs: the stream goes on
            pause = first + n / RATE - time.time()
            if pause > 0:
                time.sleep(pause)
            sent.append((time.time(), app.send_task("sampleapp.fetch", args=(queue, WORK), queue=queue)))
            n += 1
        if future is not None:
            future.result()
    for _, result in sent:
        try:
            result.get(timeout=120)
        except Exception as exc:
            raise BenchError(f"task {result.id} of the stream gave no result: {exc!r}") from None
    runs = executions(data)
    twice = [result.id for _, result in sent if len(runs.get(result.id, ())) != 1]
    if twice:
        raise BenchError(f"{len(twice)} task(s) of the stream did not run exactly once: {twice[:5]}")
    latencies = [runs[result.id][0]["end"] - at for at, result in sent]
    start, end = (started, returned) if during is not None else (sent[0][0], sent[-1][0])
    ends = sorted(runs[result.id][0]["end"] for _, result in sent)
    # Gaps that overlap the window: the one spanning its start or end counts too.
    gaps = [b - a for a, b in itertools.pairwise(ends) if b >= start and a <= end]
    return {"latencies": latencies, "gap": max(gaps, default=0.0), "tasks": len(sent), "window": end - start}

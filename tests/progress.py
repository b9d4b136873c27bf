"""Waiting on training in tests: on progress, never on a deadline tuned to a fast machine.

The same run takes a minute on one 2-core machine and many more on another (no native bf16, a
noisy neighbour). So a wait fails only when nothing moves for STALL_S seconds: no new step, no new
state or message, no new line in train.log. A run that crawls but moves is waited for.
"""

from __future__ import annotations

import time

# Long enough for the slowest step we know of (about 30 s) and a model load on a busy host, many
# times over; short enough that a hung process fails the suite well inside CI's 90 minutes.
STALL_S = 300.0


def run_progress(run) -> tuple:
    """What changes while a run is alive and working."""
    status = run.read_status()
    try:
        log_size = run.log_path.stat().st_size
    except OSError:
        log_size = 0
    return (status.get("state"), status.get("step"), status.get("message"), log_size,
            len(run.read_metrics()))


def wait_while_moving(check, progress, what: str, stall_s: float = STALL_S, interval: float = 0.5):
    """check()'s first truthy result; AssertionError once progress() has not changed for stall_s."""
    last, since = progress(), time.monotonic()
    while True:
        result = check()
        if result:
            return result
        time.sleep(interval)
        now = progress()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > stall_s:
            raise AssertionError(f"no progress for {stall_s:.0f}s while waiting for {what}; "
                                 f"last seen: {last}")


def wait_for(run, predicate, what: str = "", stall_s: float = STALL_S) -> dict:
    """The run's status once predicate(status) holds, waiting as long as the run moves."""
    def check():
        status = run.read_status()
        return status if predicate(status) else None

    try:
        return wait_while_moving(check, lambda: run_progress(run), what or f"run {run.name}",
                                 stall_s)
    except AssertionError as error:
        raise AssertionError(f"{error}\nstatus {run.read_status()}\nlog:\n{run.log_tail(30)}") \
            from None

"""Progress with numbers for the long waits of a training run, in its status.json.

The Train tab shows status.json's "message" every 2 s; a wait that only says "loading the model"
looks frozen. Progress puts "loading SmolLM2-135M-Instruct into 4-bit: 120 of 272 tensors" there,
with the numbers as fields (progress_what, progress_done, progress_total, progress_unit) for a
bar, at most once every `every_s` seconds, so a 100k-row file does not write status.json 100k
times. done() always writes the final count and logs the phase's duration to train.log once.

transformers' own progress bars (the "Loading weights" bar of from_pretrained, which also
quantizes each tensor) reach a Progress through transformers' public tqdm hook
(transformers.utils.logging.set_tqdm_hook), installed only while the model loads.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

log = logging.getLogger("engine.train")

# status.json fields a phase writes; None once no counted phase is under way
EVERY_S = 1.0  # status writes per phase at most once a second (a test may set 0: every update)
NO_PROGRESS = {"progress_what": None, "progress_done": None, "progress_total": None,
               "progress_unit": None}


class Progress:
    """One counted wait: update(done) as work gets done, done() at the end.

    `run` is a RunDir (or anything with write_status(**fields)); None writes nothing, and the
    duration is still logged. `total` may come later, with start(total) or update(done, total)."""

    def __init__(self, run, what: str, total: int | None = None, unit: str = "rows",
                 every_s: float | None = None, clock=time.monotonic):
        self.run, self.what, self.total, self.unit = run, what, total, unit
        self.every_s, self.clock = EVERY_S if every_s is None else every_s, clock
        self.count = 0
        self.started = clock()
        self.last_write = float("-inf")
        self._write()  # the wait shows at once: "...: 0 of 30,000 rows"

    def message(self) -> str:
        if self.total is None:
            return self.what if not self.count else f"{self.what}: {self.count:,} {self.unit}"
        return f"{self.what}: {self.count:,} of {self.total:,} {self.unit}"

    def start(self, total: int | None) -> None:
        """The total is known now (a progress bar opened): shown at once."""
        self.total, self.count = total, 0
        self._write()

    def update(self, done: int, total: int | None = None) -> None:
        """`done` of the total so far; written when every_s has passed since the last write."""
        self.count = done
        if total is not None:
            self.total = total
        if self.clock() - self.last_write >= self.every_s:
            self._write()

    def advance(self, n: int = 1) -> None:
        self.update(self.count + n)

    def iterate(self, items):
        """The items, one by one, each counted once the caller is done with it."""
        for item in items:
            yield item
            self.advance()

    def done(self, summary: str | None = None) -> float:
        """Write the final count (always) and log "<summary> in 1.2 s"; returns the seconds."""
        if self.total is not None:
            self.count = max(self.count, self.total)
        self._write()
        seconds = self.clock() - self.started
        log.info("%s in %.1f s", summary or self.message(), seconds)
        return seconds

    def _write(self) -> None:
        self.last_write = self.clock()
        if self.run is not None:
            self.run.write_status(message=self.message(), progress_what=self.what,
                                  progress_done=self.count, progress_total=self.total,
                                  progress_unit=self.unit)


@contextmanager
def phase(run, message: str, summary: str):
    """A wait with nothing to count (preparing the model): its message while it lasts, and its
    duration in train.log ("<summary> in 0.4 s") once it is over."""
    started = time.monotonic()
    if run is not None:
        run.write_status(message=message, **NO_PROGRESS)
    yield
    log.info("%s in %.1f s", summary, time.monotonic() - started)


@contextmanager
def transformers_bar(desc: str, progress: Progress):
    """While inside, transformers' tqdm bar named `desc` (e.g. from_pretrained's "Loading weights",
    one step per tensor loaded and quantized) reports to `progress` instead of a terminal; other
    bars are left as they are. Uses transformers' public hook and restores the previous one."""
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    if not hasattr(hf_logging, "set_tqdm_hook"):  # a transformers without the hook: no counts
        yield progress
        return

    class Bar(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})
            total = kwargs.get("total")
            if total is None:
                iterable = args[0] if args else kwargs.get("iterable")
                total = len(iterable) if hasattr(iterable, "__len__") else None
            self.n = 0
            progress.start(total)

        def __iter__(self):
            for item in self.iterable:
                yield item
                self.update(1)

        def update(self, n=1):
            self.n += n or 0
            progress.update(self.n)

    def hook(factory, args, kwargs):
        if str(kwargs.get("desc", "")).startswith(desc):
            return Bar(*args, **kwargs)
        return factory(*args, **kwargs)

    previous = hf_logging.set_tqdm_hook(hook)
    try:
        yield progress
    finally:
        hf_logging.set_tqdm_hook(previous)

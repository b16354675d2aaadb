"""The garbage collector's settings for the sending phase.

By the time rows are sent, the process holds tens of thousands of long-lived objects
(imported modules, the spec, the tokenizer, the catalog), and every row allocates
short-lived ones that reference counting frees. With the default settings the collector
rescans the long-lived objects again and again: 13% of the event loop's samples in the
sending phase (py-spy, openai protocol, zero-latency emulator, issue 15). Freezing what
exists when sending starts takes it out of every scan, and a larger young generation
makes a scan rarer; cyclic garbage is still collected.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

SENDING_THRESHOLDS = (20_000, 20, 10)
"""Young generation, then how many young scans per middle one, middle per full one."""


class _Uses:
    """The uses of ``sending_phase`` in progress, and the thresholds from before the first."""

    count = 0
    thresholds_before = gc.get_threshold()


@contextmanager
def sending_phase() -> Iterator[None]:
    """Freeze the objects alive now and space the collector's scans out, until the block ends.

    Overlapping uses (a test running two pools) share one setting: the first to start sets
    it, the last to end restores what was there before.
    """
    if _Uses.count == 0:
        gc.collect()
        gc.freeze()
        _Uses.thresholds_before = gc.get_threshold()
        gc.set_threshold(*SENDING_THRESHOLDS)
    _Uses.count += 1
    try:
        yield
    finally:
        _Uses.count -= 1
        if _Uses.count == 0:
            gc.set_threshold(*_Uses.thresholds_before)
            gc.unfreeze()

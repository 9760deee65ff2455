"""The garbage collector of a long-running process (gateway, connector): what it scans, and how often.

CPython's cycle collector walks every tracked object of a generation when it runs. In a process that
forwards tens of thousands of calls a second, measured per call (bench/README.md, "The garbage
collector"), two things showed:

* a full collection walks everything that is not frozen: every module imported after start-up (the
  connector store's SQLAlchemy, ~40,000 objects, imported at a connector's first attach) made each one
  take ~12 ms, stalling every call in flight: the tunnel's p99 at C=50 was 15 ms against p50 3.5 ms;
* the youngest generation, at CPython's default threshold of 700 allocations, was collected every
  ~30 calls at C=50, each time walking the state of every call in flight: ~2.5 µs per call.
"""

from __future__ import annotations

import gc

# Allocations (net of frees) between two collections of the youngest generation. 700 (CPython's
# default) cost ~5 % of the gateway's throughput at C=50; 5,000 and 20,000 measured the same as the
# collector switched off. What it can hold back is cyclic garbage, which these processes make little
# of (~1,000 objects collected in 50,000 calls): at most a few MB.
GEN0_THRESHOLD = 5_000


def settle_heap() -> None:
    """Move everything made so far (modules, config, app, an opened store) out of the collector's
    sight, and collect the youngest generation less often.

    Called once start-up is done, and again after a late start-up step (the relay opening its
    connector store): a full collection then walks what requests allocate, not the program. Objects
    frozen while alive are still freed by reference counting; only a cycle among them that dies
    later stays (so this runs at a handful of moments, not periodically)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, older, oldest)

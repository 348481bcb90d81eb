"""Stage timings: how long each stage took, for the report and the log."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger("tumorseg.pipeline")


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Record the seconds the block took as ``timings[stage]``, logging its start and end."""
    log.info("%s ...", stage)
    start = time.perf_counter()
    yield
    timings[stage] = time.perf_counter() - start
    log.info("%s done in %.2f s", stage, timings[stage])

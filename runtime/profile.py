"""The one reader of onnxruntime profiles (Chrome trace JSON, ``SessionOptions.enable_profiling``).

``kernel_events(path)`` yields one ``KernelEvent`` per node kernel that ran: which ``session.run`` it
belongs to (0, 1, ... in call order), the node name, op type, provider, duration and input shapes.
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass
from typing import Iterator

_KERNEL_SUFFIX = "_kernel_time"


@dataclass(frozen=True)
class KernelEvent:
    run: int  # index of the session.run call; -1 for kernels outside every run (initialisation)
    node: str
    op_type: str
    provider: str
    seconds: float
    input_shapes: tuple = ()  # one shape (tuple of ints) per input onnxruntime recorded

    @property
    def idle(self) -> bool:
        """An input had no elements (e.g. an expert that got no token): the kernel had nothing to compute."""
        return any(0 in shape for shape in self.input_shapes)


def kernel_events(profile_file: str | os.PathLike) -> Iterator[KernelEvent]:
    with open(profile_file) as handle:
        events = json.load(handle)
    # A run's "model_run" event is written after its kernels': a kernel belongs to the run whose span holds it.
    runs = sorted((e.get("ts", 0), e.get("ts", 0) + e.get("dur", 0)) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    starts = [start for start, _ in runs]
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith(_KERNEL_SUFFIX):
            continue
        run = bisect.bisect_right(starts, event.get("ts", 0)) - 1
        if run >= 0 and event.get("ts", 0) > runs[run][1]:
            run = -1
        args = event.get("args", {})
        shapes = tuple(tuple(dims) for shape in args.get("input_type_shape", []) for dims in shape.values())
        yield KernelEvent(run, event["name"].removesuffix(_KERNEL_SUFFIX), args.get("op_name", "?"),
                          args.get("provider", "?"), event.get("dur", 0) / 1e6, shapes)

"""The one reader of onnxruntime profiles (Chrome trace JSON, ``SessionOptions.enable_profiling``).

``kernel_events(path)`` yields one ``KernelEvent`` per node kernel that ran: which ``session.run`` it
belongs to (0, 1, ... in call order), the node name, op type, provider and duration.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterator

_KERNEL_SUFFIX = "_kernel_time"


@dataclass(frozen=True)
class KernelEvent:
    run: int  # index of the session.run call; -1 for kernels before the first (initialisation)
    node: str
    op_type: str
    provider: str
    seconds: float


def kernel_events(profile_file: str | os.PathLike) -> Iterator[KernelEvent]:
    with open(profile_file) as handle:
        events = json.load(handle)
    run = -1
    for event in events:
        if event.get("cat") == "Session" and event.get("name") == "model_run":
            run += 1
        if event.get("cat") != "Node" or not event.get("name", "").endswith(_KERNEL_SUFFIX):
            continue
        args = event.get("args", {})
        yield KernelEvent(run, event["name"].removesuffix(_KERNEL_SUFFIX), args.get("op_name", "?"),
                          args.get("provider", "?"), event.get("dur", 0) / 1e6)

"""Helpers shared by run, bench, inspect and package: tensor specs, the input check, .npz output.

A ``TensorSpec`` describes one graph input or output as onnxruntime reports it: ``shape`` holds an int
for a fixed dim and a name (``"batch"``) or ``None`` for a dynamic one. Exported moeport models take
``input_ids [batch, sequence] int64`` and return ``logits [batch, sequence, vocab] float32``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeport._fs import check_output_file, staged_file, writing
from moeport.errors import MoeportError, UsageError

# onnxruntime type strings -> numpy dtypes (the ones an input check can meet).
_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16, "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name ("int64"), or onnxruntime's type string when numpy has none
    shape: tuple  # int for a fixed dim, str (dim_param) or None for a dynamic one

    @classmethod
    def from_ort(cls, node_arg) -> "TensorSpec":
        np_type = _ORT_TYPES.get(node_arg.type)
        dtype = np.dtype(np_type).name if np_type is not None else node_arg.type
        return cls(node_arg.name, dtype, tuple(node_arg.shape))

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: ("?" if d is None else d) for i, d in enumerate(self.shape) if not isinstance(d, int)}

    def shape_text(self) -> str:
        """``[batch, sequence]`` -- how error messages and reports spell the expected shape."""
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "dynamic_axes": {str(k): v for k, v in self.dynamic_axes.items()}}


_LAYER_INDEX = re.compile(r"(?<=\.)(\d+)(?=\.|$)")  # the first dotted number: past_key_values.3.key


def group_per_layer(items: list, key) -> list[tuple[str, list]]:
    """``items`` (each named by ``key(item)[0]``) in groups of those whose names differ only in a layer index and
    whose other ``key`` fields are equal, each named for all its members (``past_key_values.{0..3,5}.key``; a
    lone item keeps its name), in the order of each group's first member."""
    groups: dict[tuple, list[tuple[int, object]]] = {}
    for item in items:
        name, *rest = key(item)
        match = _LAYER_INDEX.search(name)
        # the text around the index; a name without one is a group of its own (no text after it: None)
        around = (name, None) if match is None else (name[:match.start()], name[match.end():])
        groups.setdefault((*around, *rest), []).append((-1 if match is None else int(match.group(1)), item))
    named = []
    for (before, after, *_), members in groups.items():
        if len(members) == 1:
            named.append((key(members[0][1])[0], [members[0][1]]))
        else:
            indices = _index_ranges([i for i, _ in members])
            named.append((f"{before}{{{indices}}}{after}", [item for _, item in members]))
    return named


def shapes_text(shapes: dict[str, tuple | list]) -> str:
    """``input_ids [1, 8], past_key_values.{0..23}.key [1, 8, 0, 64], ...``: the shapes of a run's inputs by name
    (tuples, or lists as JSON keeps them), per-layer ones (a with-past model's cache) once per kind
    (``group_per_layer``)."""
    return ", ".join(f"{name} {list(group[0][1])}" for name, group in
                     group_per_layer(list(shapes.items()), lambda item: (item[0], tuple(item[1]))))


def _index_ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5, 6]`` -> ``"0..2,5..6"``."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}..{b}" for a, b in runs)


def session_specs(session) -> tuple[list[TensorSpec], list[TensorSpec]]:
    return ([TensorSpec.from_ort(a) for a in session.get_inputs()],
            [TensorSpec.from_ort(a) for a in session.get_outputs()])


def check_inputs(feeds: dict[str, np.ndarray], specs: list[TensorSpec], vocab_size: int | None = None) -> None:
    """Raise a one-line MoeportError for the first input that does not fit ``specs``.

    Checked in order: missing and unexpected names, rank, dtype, fixed dims, then (for ``input_ids``
    when the vocabulary size is known) token ids outside ``[0, vocab_size)``. Everything here runs before
    onnxruntime sees the arrays, because its own messages name internal nodes, not the user's input.
    """
    expected = {s.name: s for s in specs}
    missing = [name for name in expected if name not in feeds]
    if missing:
        raise MoeportError(f"input {missing[0]!r} is missing; the model expects inputs "
                           f"{', '.join(repr(s.name) for s in specs)} and got {', '.join(map(repr, feeds)) or 'none'}")
    extra = [name for name in feeds if name not in expected]
    if extra:
        raise MoeportError(f"input {extra[0]!r} is not an input of the model; it expects "
                           f"{', '.join(repr(s.name) for s in specs)}")
    for spec in specs:
        array = feeds[spec.name]
        if array.ndim != len(spec.shape):
            raise MoeportError(f"input {spec.name!r} has shape {tuple(array.shape)}; the model expects "
                               f"{spec.shape_text()} (rank {len(spec.shape)})")
        if array.dtype.name != spec.dtype:
            raise MoeportError(f"input {spec.name!r} has dtype {array.dtype.name}; the model expects {spec.dtype} "
                               f"with shape {spec.shape_text()}")
        for axis, (got, want) in enumerate(zip(array.shape, spec.shape)):
            if isinstance(want, int) and got != want:
                raise MoeportError(f"input {spec.name!r} has shape {tuple(array.shape)}; the model expects "
                                   f"{spec.shape_text()} (dim {axis} must be {want})")
            if got == 0:
                raise MoeportError(f"input {spec.name!r} has shape {tuple(array.shape)}; dim {axis} is empty")
    ids = feeds.get("input_ids")
    if vocab_size is not None and ids is not None and ids.size and np.issubdtype(ids.dtype, np.integer):
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            position = tuple(int(i) for i in np.argwhere(ids == bad)[0])
            raise MoeportError(f"input 'input_ids' holds token id {bad} at {position}, outside the vocabulary "
                               f"[0, {vocab_size})")


def check_prompt_mask(mask: np.ndarray, ids: np.ndarray, source: str) -> None:
    """One-line MoeportErrors for an ``attention_mask`` that cannot be a prompt's: not the shape of its ``input_ids``
    ``[rows, seq]``, values other than 0 and 1, or a row with every token masked. ``source`` starts each message
    (``"input"``, ``"calibration file data.npz:"``)."""
    if mask.shape != ids.shape:
        raise MoeportError(f"{source} 'attention_mask' is {list(mask.shape)} but 'input_ids' is {list(ids.shape)}; "
                           "a mask covers the ids")
    if not np.isin(mask, (0, 1)).all():
        raise MoeportError(f"{source} 'attention_mask' holds values other than 0 and 1")
    empty = np.flatnonzero(mask.sum(axis=1) == 0)
    if empty.size:
        raise MoeportError(f"{source} 'attention_mask' masks every token of row(s) {empty.tolist()[:5]}")


def save_npz(path: Path, arrays: dict[str, np.ndarray], force: bool = False) -> Path:
    """Write ``arrays`` to ``path`` atomically (np.savez through a file object, so no ``.npz`` is appended)."""
    check_output_file(path, force)
    with staged_file(path) as staging, writing(path), open(staging / path.name, "wb") as handle:
        np.savez(handle, **arrays)
    return path


def parse_fixed_shapes(items: list[str] | tuple[str, ...]) -> dict[str, list[int]]:
    """``["input_ids=1x64"]`` -> ``{"input_ids": [1, 64]}``; anything else is a usage error."""
    shapes = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            values = [int(d) for d in dims.lower().split("x")] if sep and name.strip() else []
        except ValueError:
            values = []
        if not values or min(values) < 1:
            raise UsageError(f"cannot parse shape {item!r}: expected NAME=D0xD1..., e.g. input_ids=1x64")
        shapes[name.strip()] = values
    return shapes

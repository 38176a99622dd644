"""What the CLI's command modules share: output helpers, common options, choices read from registries."""

from __future__ import annotations

import json
from typing import Callable

import click


def echo_json(data: dict) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def warn(messages: list[str]) -> None:
    for message in messages:
        click.echo(f"warning: {message}", err=True)


def emit(result, as_json: bool) -> None:
    """Print a library result: ``render()``, or with ``--json`` its ``to_dict()`` on stdout and its
    ``warnings`` on stderr (so stdout stays one JSON document)."""
    if as_json:
        warn(result.warnings)
        echo_json(result.to_dict())
    else:
        click.echo(result.render())


class LazyChoice(click.Choice):
    """``click.Choice`` over a registry's names, read when click first needs them (help or parsing), not at
    start-up: the registries live in modules that import onnx, onnxruntime or torch."""

    def __init__(self, names: Callable[[], list[str]], case_sensitive: bool = True):
        self._names = names
        self._choices: tuple[str, ...] | None = None
        self.case_sensitive = case_sensitive

    @property
    def choices(self) -> tuple[str, ...]:
        if self._choices is None:
            self._choices = tuple(self._names())
        return self._choices

    @choices.setter
    def choices(self, value) -> None:
        self._choices = tuple(value)


EP = click.option("--ep", default="cpu", show_default=True, help="Execution provider short name.")
FALLBACK = click.option("--fallback", default=None, help="Provider to use when --ep is not available (e.g. cpu).")
JSON = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")

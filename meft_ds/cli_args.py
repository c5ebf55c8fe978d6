"""Command-line flags from a dataclass, one `--<field>` per field: the trainer's (RunArgs) and the memory
benchmark's (BenchConfig), so that a new field is a new flag with its help text in both."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing


def _flag_type(annotation) -> type:
    """int for `int | None`, and so on: the one non-None type of a field."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    return annotation


def add_flags(parser, cls, names=None, *, defaults: bool = True) -> None:
    """Add `--<name>` to `parser` (or an argument group) for each field of the dataclass `cls` (those in `names`,
    default all, in field order), with the field metadata's "help" (required) and "choices" (optional).

    defaults=True: a flag defaults to its field's default, named at the end of the help unless the help says
    "Default" itself; a bool field is a switch (given = True), with a --no-<name> form when it defaults to True.
    defaults=False: every flag defaults to None, "not given", for a caller that merges the given flags over a
    preset; a bool field then always has both forms. A `tuple[X, ...]` field takes a comma-separated list.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if names is not None and f.name not in names:
            continue
        kind = _flag_type(hints[f.name])
        text = f.metadata["help"].replace("%", "%%")  # argparse formats help texts with %
        options = {"default": f.default if defaults else None}
        if kind is bool:
            # A switch that is on by default, or whose absence must be told apart, also needs its --no- form.
            options["action"] = argparse.BooleanOptionalAction if f.default or not defaults else "store_true"
        elif typing.get_origin(kind) is tuple:
            item_type = typing.get_args(kind)[0]

            def comma_list(value: str, item_type=item_type) -> tuple:  # its name is in argparse's error line
                return tuple(item_type(item) for item in value.split(",") if item)

            options["type"] = comma_list
            text += " Comma separated."
        else:
            options.update(type=kind, choices=f.metadata.get("choices"))
        if defaults and "Default" not in text and f.default is not None:
            text += f" Default: {f.default}."
        parser.add_argument(f"--{f.name}", help=text, **options)

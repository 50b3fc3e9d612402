"""Flags made from config dataclasses: one place per field (``bench.core.options.option``:
name, type, default, help), so a default is never copied into the parser and a config
is never copied from the parsed arguments field by field."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Callable


def _flag(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def _dest(field: dataclasses.Field) -> str:
    return _flag(field).lstrip("-").replace("-", "_")


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return field.default


def _value_type(hint: Any) -> tuple[Any, bool]:
    """``(element type, is a list)`` of a field's type hint (``X | None`` read as ``X``)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _value_type(args[0]) if len(args) == 1 else (str, False)
    if origin in (list, tuple):
        args = typing.get_args(hint)
        return (args[0] if args else str), True
    return hint, False


def add_flags(parser: argparse.ArgumentParser, config: type, *, parsers: dict[str, Callable[[str], Any]],
              choices: dict[str, list[str]] | None = None, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of the dataclass ``config`` that is on the command line: its help
    from the field, its default the field's default (shown by the help formatter), its type
    from the field's type (a list takes one or more values, or repeats with ``append``).
    ``parsers`` maps the fields' ``parse`` names to argparse types; ``choices`` the named
    choice lists (``"initializers"``)."""
    hints = typing.get_type_hints(config)
    for field in dataclasses.fields(config):
        meta = field.metadata
        if not meta.get("cli", True) or field.name in skip:
            continue
        if "help" not in meta:
            raise TypeError(f"{config.__name__}.{field.name} has no help: declare it with bench.core.options.option")
        kind, many = _value_type(hints[field.name])
        kwargs: dict[str, Any] = {"help": meta["help"], "default": _default(field), "dest": _dest(field)}
        if meta.get("parse"):
            kwargs["type"] = parsers[meta["parse"]]
        elif kind is bool:
            if kwargs["default"] is True and not meta.get("flag"):
                raise TypeError(f"{config.__name__}.{field.name}: a boolean that defaults to True needs a flag that "
                                "turns it off (flag='--no-...')")
            kwargs["action"] = "store_false" if kwargs["default"] is True else "store_true"
        elif kind in (int, float, str, Path):
            kwargs["type"] = kind
        named = meta.get("choices")
        if named is not None:
            kwargs["choices"] = (choices or {})[named] if isinstance(named, str) else list(named)
            if isinstance(named, str):  # a long list (the registered initializers): named, not spelled, in the usage
                kwargs["metavar"] = "NAME"
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        if meta.get("required"):
            kwargs["required"] = True
            kwargs.pop("default")
        if many and kind is not bool:
            if meta.get("append"):
                kwargs["action"] = "append"
                # argparse appends to a given default, so the flag's is None and the field's is shown
                shown = " ".join(map(str, kwargs["default"])).replace("%", "%%") or "none"
                kwargs["default"] = None
                kwargs["help"] = f"{kwargs['help']} (default: {shown})"
            else:
                kwargs["nargs"] = "+"
        parser.add_argument(_flag(field), **kwargs)


def from_flags(config: type, args: argparse.Namespace, **values: Any) -> Any:
    """``config(...)`` from the parsed flags of its fields (an appended flag never given: the
    field's default), with ``values`` for the fields the command sets itself."""
    data: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        if field.name in values or not field.metadata.get("cli", True):
            continue
        if not hasattr(args, _dest(field)):
            continue
        value = getattr(args, _dest(field))
        data[field.name] = _default(field) if value is None and field.metadata.get("append") else value
    return config(**data, **values)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help with its default (``none`` where it has none; not for switches)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "(default: " in text or action.default is argparse.SUPPRESS or action.required or isinstance(
                action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction,
                         argparse._SubParsersAction)):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            default = action.default
            shown = "none" if default is None or default == [] else (
                " ".join(map(str, default)).replace("%", "%%") if isinstance(default, (list, tuple)) else "%(default)s")
            return f"{text} (default: {shown})"
        return text

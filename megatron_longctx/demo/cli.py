"""Command-line flags generated from a settings dataclass: default, type and help written once.

Each field of a dataclass becomes one flag. The flag name is the field name with dashes
(``total_words`` -> ``--total-words``) unless the field's metadata names it (``"flag"``); the
help text is the metadata's ``"help"`` with the field's default appended; the type is the
metadata's ``"type"`` (a parser such as `parse_domain_shares`) or the field's annotation
(``int``, ``float``, ``str``); ``"choices"`` and ``"metavar"`` pass through to argparse.

Unset flags stay out of the parsed namespace (argparse's ``SUPPRESS``), so `settings_from_args`
builds the dataclass from the given flags only and every default comes from the dataclass: the
parser cannot drift from it. The trade-off: ``args.total_words`` does not exist unless the flag
was given; read settings, not the namespace. Validation stays in the dataclass, whose messages
name the flag (`flag_of` gives the name).

The training and mixture CLIs keep their own bridge (megatron_longctx/config/cli.py, Megatron-LM
flag names); this one serves the demo's tools (tools/demo.py, tools/make_corpus.py,
tools/ablate_mixture.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["add_settings_arguments", "flag_of", "help_field", "settings_from_args"]

_SIMPLE_TYPES = {"int": int, "float": float, "str": str}


def help_field(default: Any = dataclasses.MISSING, *, help: str, flag: str | None = None,
               default_factory: Any = dataclasses.MISSING, **argparse_options: Any) -> Any:
    """A dataclass field carrying its flag's help text (and optional flag name, type, choices).

    Args:
        default: The field's default.
        help: Help text of the flag, without the default (appended by the parser).
        flag: Flag name; default ``--`` + the field name with dashes.
        default_factory: Instead of `default`, for mutable or computed defaults.
        **argparse_options: ``type``, ``choices``, ``metavar`` or ``default_help`` (the text
            shown instead of the default's value).

    Returns:
        A `dataclasses.field`.
    """
    metadata = {"help": help, **argparse_options}
    if flag is not None:
        metadata["flag"] = flag
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_of(field: dataclasses.Field) -> str:
    """The command-line flag of a dataclass field."""
    return field.metadata.get("flag", "--" + field.name.replace("_", "-"))


def _default_text(field: dataclasses.Field) -> str:
    if "default_help" in field.metadata:
        return str(field.metadata["default_help"])
    if field.default is not dataclasses.MISSING:
        return str(field.default)
    if field.default_factory is not dataclasses.MISSING:
        return str(field.default_factory())
    return "required"


def _argparse_type(parse: Any) -> Any:
    """`parse`, its ValueError message kept (argparse would print "invalid value" instead)."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def add_settings_arguments(parser: argparse.ArgumentParser, cls: type,
                           skip: Iterable[str] = ()) -> None:
    """Add one flag per field of dataclass `cls` (except `skip`) to `parser`.

    Args:
        parser: The parser (or argument group) to extend.
        cls: A dataclass whose fields carry `help_field` metadata.
        skip: Field names that get no flag (set by the caller instead).
    """
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip or not field.init:
            continue
        options: dict[str, Any] = {"default": argparse.SUPPRESS}
        for name in ("choices", "metavar"):
            if name in field.metadata:
                options[name] = field.metadata[name]
        if "type" in field.metadata:
            options["type"] = _argparse_type(field.metadata["type"])
        elif getattr(hints[field.name], "__name__", "") in _SIMPLE_TYPES:
            options["type"] = _SIMPLE_TYPES[hints[field.name].__name__]
        help_text = field.metadata.get("help", "")
        options["help"] = f"{help_text} (default: {_default_text(field)})".replace("%", "%%")
        if (field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING):
            options["required"] = True
            options.pop("default")
        parser.add_argument(flag_of(field), dest=field.name, **options)


def settings_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """Build dataclass `cls` from the flags that were given, plus `overrides`.

    Args:
        cls: The dataclass `add_settings_arguments` added flags for.
        args: The parsed namespace (unset flags absent).
        **overrides: Field values set by the caller (e.g. skipped fields).

    Returns:
        ``cls(**given, **overrides)``; its own validation runs (ValueError names the flag).
    """
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    return cls(**{**given, **overrides})

"""Command-line flags generated from config dataclass fields: default, type and help once.

A field that a tool exposes declares its flag where the field is declared:

    micro_batch_size: int = option(1, Flag("--micro-batch-size", "sequences per micro-batch"))

`add_config_flags(parser, cls)` adds one argparse option per such field (recursing into fields
whose type is itself a config dataclass, e.g. `PretrainConfig.parallel`), inferring the argparse
shape from the annotation: `bool` -> store_true, `list[T]` / `tuple[T, ...]` -> nargs "+",
`Literal[...]` -> choices, `int`/`float`/`str` -> type; `X | None` unwraps to X.
`config_from_namespace(cls, ns)` is the one generic translation back: the given flags are the
constructor's keyword arguments and every other field keeps its dataclass default, so the
default lives in one place. Argparse gets `SUPPRESS` as its default (a flag not given is absent
from the namespace); `--help` prints the dataclass default read from the field itself.

Deliberate exceptions are declared, not implied:

* `Flag.cli_default`: the command line starts from another value than the dataclass, with the
  reason in the help (e.g. `--transformer-impl`: None = "TE when importable" on the CLI, while
  code that builds a `PrecisionConfig()` directly gets the local spec; `--workers` and
  `--shard-index` come from the machine / SLURM environment when the parser is built).
* `derived(...)`: a field no flag sets directly, with the flags it is derived from
  (`params_dtype` from `--bf16` / `--fp16`); tests check that those flags exist.
* Megatron-LM compatibility switches that are not fields (`--swiglu`, `--group-query-attention`,
  ...) are declared by each tool next to its parser.
* `Flag.one_value`: a list/tuple field given as one string that `Flag.parse` turns into the whole
  value (the demo tools' `--strategies per-source,cut`), instead of nargs "+".

`Flag.parse` errors keep their message: a ValueError from the parser is shown as argparse's
error for that flag (argparse alone would print "invalid parse_x value").

Trade-off: the argparse shape is inferred from annotations, so an unusual type needs an explicit
`Flag.parse` (`--upweight DOMAIN=FACTOR,...` -> dict); in exchange the ~110 training flags need
no restated defaults, and a test (tests/unit/test_cli_defaults.py) checks every field is
reachable.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from typing import Any

#: dataclasses.field metadata key holding a Flag or a Derived.
FLAG_KEY = "megatron_longctx.flag"


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


#: Flag.cli_default when the CLI starts from the field default (the usual case).
UNSET: Any = _Unset()


@dataclass(frozen=True)
class Flag:
    """How one config field appears on the command line.

    Attributes:
        name: the flag (Megatron-LM's name where one exists), e.g. `--micro-batch-size`.
        help: help text; `--help` appends the default.
        aliases: other accepted spellings.
        action: "store_false" for a flag that only switches a default-on/auto field off
            (`--no-rope-fusion`); otherwise inferred from the annotation.
        negative: for an auto (`bool | None`) field, the flag that sets it False
            (`--no-overlap-grad-reduce` beside `--overlap-grad-reduce`).
        required: the tool cannot run without it.
        choices: allowed values (else from a `Literal` annotation).
        parse: converts the string (list items for list fields); default from the annotation.
        cli_default: the CLI's starting value when it differs from the field default, a value
            or a zero-argument callable evaluated when the parser is built.
        metavar: placeholder in --help.
        group: argument-group key; default the field's config section.
        one_value: list/tuple field parsed from one string by `parse` (comma lists).
        default_help: text shown as the default in --help instead of the value (computed or
            long defaults).
    """

    name: str
    help: str
    aliases: tuple[str, ...] = ()
    action: str | None = None
    negative: str | None = None
    required: bool = False
    choices: tuple[Any, ...] | None = None
    parse: Callable[[str], Any] | None = None
    cli_default: Any = UNSET
    metavar: str | None = None
    group: str | None = None
    one_value: bool = False
    default_help: str | None = None


@dataclass(frozen=True)
class Derived:
    """A field no flag sets directly: which flags it comes from, and how."""

    flags: tuple[str, ...]
    note: str


def option(default: Any = MISSING, flag: Flag | None = None, *,
           default_factory: Callable[[], Any] | Any = MISSING) -> Any:
    """A dataclass field with its flag (a plain field when `flag` is None)."""
    metadata = {FLAG_KEY: flag} if flag is not None else {}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def derived(default: Any, *flags: str, note: str) -> Any:
    """A dataclass field set from other flags (`flags`), not by a flag of its own."""
    return dataclasses.field(default=default, metadata={FLAG_KEY: Derived(flags, note)})


def _unwrap_optional(hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def field_hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass, `X | None` unwrapped to X."""
    return {k: _unwrap_optional(v) for k, v in typing.get_type_hints(cls).items()}


def is_config_class(hint: Any) -> bool:
    """Whether a (resolved) annotation is a nested config dataclass."""
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def field_default(f: dataclasses.Field) -> Any:
    """The dataclass default of a field (MISSING for a required one)."""
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


def cli_default(f: dataclasses.Field) -> Any:
    """The value the command line starts from: Flag.cli_default, else the field default."""
    flag = f.metadata.get(FLAG_KEY)
    if isinstance(flag, Flag) and flag.cli_default is not UNSET:
        value = flag.cli_default
        return value() if callable(value) else value
    return field_default(f)


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of a config field (for validation messages)."""
    flag = f.metadata.get(FLAG_KEY)
    if not isinstance(flag, Flag):
        raise ValueError(f"field {f.name!r} declares no flag")
    return flag.name


def _keep_message(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse` with its ValueError text shown by argparse (not "invalid <name> value")."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _argparse_kwargs(flag: Flag, hint: Any) -> dict[str, Any]:
    """nargs / type / choices / action from the annotation (see module docstring)."""
    kwargs: dict[str, Any] = {}
    origin = typing.get_origin(hint)
    parse = _keep_message(flag.parse) if flag.parse is not None else None
    if flag.one_value and parse is None:
        raise TypeError(f"{flag.name}: one_value needs a parse function")
    if flag.action is not None:
        kwargs["action"] = flag.action
    elif hint is bool:
        kwargs["action"] = "store_true"
    elif origin in (list, tuple) and not flag.one_value:
        kwargs["nargs"] = "+"
        kwargs["type"] = parse or typing.get_args(hint)[0]
    elif origin is typing.Literal:
        kwargs["choices"] = typing.get_args(hint)
    elif parse is not None:
        kwargs["type"] = parse
    elif hint in (int, float, str):
        kwargs["type"] = hint
    if flag.choices is not None:
        kwargs["choices"] = flag.choices
    if "action" not in kwargs and "choices" not in kwargs:
        kwargs["metavar"] = flag.metavar or flag.name.lstrip("-").replace("-", "_").upper()
    return kwargs


def _help(flag: Flag, f: dataclasses.Field, default_note: str | None) -> str:
    if flag.default_help is not None:
        return f"{flag.help} (default: {flag.default_help})"
    if flag.required or callable(flag.cli_default):
        return flag.help  # required, or the help names where the default comes from
    if default_note is not None:
        return f"{flag.help} (default: {default_note})"
    default = cli_default(f)
    if default is MISSING or default is None or default is False or default in ({}, []):
        return flag.help
    shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
    return f"{flag.help} (default: {shown})"


def add_config_flags(parser: argparse.ArgumentParser, cls: type, *, section: str = "",
                     titles: dict[str, str] | None = None,
                     default_notes: dict[str, str] | None = None) -> None:
    """Add a flag for every field of `cls` (and nested config dataclasses) that declares one.

    Args:
        parser: the tool's parser.
        cls: the config dataclass.
        section: dotted path of `cls` inside the root config ("" for the root).
        titles: argument-group title per section or Flag.group key; sections without one
            share their parent's group.
        default_notes: per section, a note shown instead of field defaults (the model's
            defaults come from --model-preset).
    """
    titles, default_notes = titles or {}, default_notes or {}
    groups: dict[str, Any] = getattr(parser, "_config_groups", {})
    parser._config_groups = groups  # type: ignore[attr-defined]
    for key, title in titles.items():  # groups in the order the tool lists them
        if key not in groups:
            groups[key] = parser.add_argument_group(title)
    hints = field_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{section}.{f.name}" if section else f.name
        if is_config_class(hints[f.name]) and FLAG_KEY not in f.metadata:
            add_config_flags(parser, hints[f.name], section=path, titles=titles,
                             default_notes=default_notes)
            continue
        flag = f.metadata.get(FLAG_KEY)
        if not isinstance(flag, Flag):
            continue
        key = flag.group or section.split(".")[0]
        if key not in groups:
            groups[key] = parser.add_argument_group(titles[key]) if key in titles else parser
        target = groups[key]
        start = argparse.SUPPRESS if flag.cli_default is UNSET else cli_default(f)
        target.add_argument(flag.name, *flag.aliases, dest=path, default=start,
                            required=flag.required,
                            help=_help(flag, f, default_notes.get(section.split(".")[0]))
                            .replace("%", "%%"),
                            **_argparse_kwargs(flag, hints[f.name]))
        if flag.negative:
            target.add_argument(flag.negative, dest=path, action="store_false",
                                default=argparse.SUPPRESS, help=f"turn {flag.name} off")


def given(ns: argparse.Namespace, section: str) -> dict[str, Any]:
    """The flags of one section present in the namespace: {field name: value}."""
    prefix = f"{section}." if section else ""
    out = {}
    for key, value in vars(ns).items():
        if key.startswith(prefix) and "." not in key[len(prefix):]:
            out[key[len(prefix):]] = value
    return out


def config_from_namespace(cls: type, ns: argparse.Namespace, *, section: str = "",
                          fixed: dict[str, Any] | None = None) -> Any:
    """Build `cls` from the flags given (recursively), other fields at their defaults.

    Args:
        cls: the config dataclass.
        ns: parsed namespace (dests are dotted field paths).
        section: dotted path of `cls` in the root config.
        fixed: values by dotted path set by the tool's own translation (derived fields, or
            a whole nested config such as the preset-based model); they win over flags.
    """
    fixed = fixed or {}
    hints = field_hints(cls)
    # The tool's own flags (`--output-dir`, ...) share the namespace: keep this class's fields.
    kwargs = {k: v for k, v in given(ns, section).items() if k in hints}
    for name, value in list(kwargs.items()):
        if typing.get_origin(hints[name]) is tuple and value is not None:
            kwargs[name] = tuple(value)
    for f in dataclasses.fields(cls):
        path = f"{section}.{f.name}" if section else f.name
        if path in fixed:
            kwargs[f.name] = fixed[path]
        elif is_config_class(hints[f.name]) and FLAG_KEY not in f.metadata:
            kwargs[f.name] = config_from_namespace(hints[f.name], ns, section=path, fixed=fixed)
    return cls(**kwargs)


def iter_fields(cls: type, section: str = "") -> list[tuple[str, dataclasses.Field]]:
    """(dotted path, field) for every leaf field of `cls` and its nested config classes."""
    out: list[tuple[str, dataclasses.Field]] = []
    hints = field_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{section}.{f.name}" if section else f.name
        if is_config_class(hints[f.name]) and FLAG_KEY not in f.metadata:
            out.extend(iter_fields(hints[f.name], path))
        else:
            out.append((path, f))
    return out

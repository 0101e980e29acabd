"""The engine's command-line flags, generated from the config groups' fields.

Every user field of a group becomes one flag, so a new setting is a new field and nothing else:
its spelling is ``--field-name`` unless its metadata says ``flag`` (plus any ``aliases``), its
type comes from the annotation (``int``, ``float``, ``str``, each optionally ``| None``;
``bool`` and ``bool | None`` become ``--x / --no-x``), its ``choices`` and ``help`` from the
metadata, and the help shows the default. Each group is one argument group titled by its class.

``engine_kwargs_from_args`` reads the parsed flags back as the flat keywords of
``EngineConfig``. The ``--model`` flag is stored as ``model_flag`` because ``generate`` and
``serve`` also take MODEL as a positional; those commands decide which one wins and overwrite
``kwargs["model"]``.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, Field
from typing import Any

from pagedllm.config.engine import CONFIG_GROUPS
from pagedllm.config.utils import user_fields

_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}


def flag_names(f: Field[Any]) -> list[str]:
    """The option strings of field ``f``: its flag, then its aliases."""
    main = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
    return [main, *f.metadata.get("aliases", ())]


def flag_dest(f: Field[Any]) -> str:
    """Where argparse stores field ``f``'s value."""
    return str(f.metadata.get("dest", f.name))


def _base_type(f: Field[Any]) -> type:
    """``int`` for ``int`` or ``int | None`` (likewise float, str, bool); else TypeError."""
    ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    parts = [p.strip() for p in ann.split("|") if p.strip() != "None"]
    if len(parts) != 1 or parts[0] not in _TYPES:
        raise TypeError(f"No CLI flag for config field {f.name!r} annotated {ann!r}.")
    return _TYPES[parts[0]]


def flag_help(f: Field[Any]) -> str:
    """The help of field ``f``'s flag: its ``help``, then its default (``default_help`` says
    what None stands for)."""
    meta = f.metadata
    if f.default is MISSING or not meta.get("help"):
        raise TypeError(f"Config field {f.name!r} needs a default and a help text.")
    if f.default is None and not meta.get("default_help"):
        raise TypeError(f"Config field {f.name!r} defaults to None but has no default_help.")
    default = meta["default_help"] if f.default is None else f.default
    return f"{meta['help']} (default: {default})"


def _add_flag(group: argparse._ArgumentGroup, f: Field[Any]) -> None:
    kwargs: dict[str, Any] = {"dest": flag_dest(f), "default": f.default}
    base = _base_type(f)
    if base is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = base
        kwargs["metavar"] = f.name.upper()
    if "choices" in f.metadata:
        kwargs["choices"] = list(f.metadata["choices"])
        kwargs.pop("metavar", None)  # argparse lists the choices instead
    action = group.add_argument(*flag_names(f), **kwargs)
    # Set after construction: some Python versions' BooleanOptionalAction append the default.
    action.help = flag_help(f).replace("%", "%%")


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per user field of config class ``cls``, in an argument group titled by the
    class (described by its docstring's first line)."""
    doc = (cls.__doc__ or "").strip().splitlines()
    group = parser.add_argument_group(cls.__name__, doc[0] if doc else None)
    for f in user_fields(cls):
        _add_flag(group, f)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Add the flags of every ``EngineConfig`` group (``add_config_args`` for each)."""
    for cls in CONFIG_GROUPS.values():
        add_config_args(parser, cls)


def engine_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The flat ``EngineConfig`` keywords of parsed flags (``model`` from ``--model`` only)."""
    return {
        f.name: getattr(args, flag_dest(f))
        for cls in CONFIG_GROUPS.values()
        for f in user_fields(cls)
    }

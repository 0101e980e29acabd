"""What the config groups share: the error they raise, their field metadata, dtype names.

Each group is a plain dataclass. A field the user sets (``init=True``) documents itself in its
``metadata``: ``help`` (required); ``default_help`` (required when the default is None: what
an unset field becomes); optionally ``choices``, ``flag`` (the CLI spelling when it is not
``--field-name``), ``aliases`` and ``dest`` (the argparse destination when it is not the field
name). ``cli_args.py`` builds the flags from that metadata and the groups validate
against the same ``choices``, so every list of allowed values is written once.

Nothing here imports torch: ``pagedllm --help`` and the torch-free ``core/`` import the config
package, so torch is imported only inside the functions that build torch objects.
"""

from __future__ import annotations

from dataclasses import Field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# ``--dtype`` names and the torch dtype each stands for (by its attribute name in ``torch``).
DTYPE_NAMES: dict[str, str] = {
    "float32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "float16": "float16",
    "half": "float16",
}


def torch_dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a name in ``DTYPE_NAMES`` (imports torch)."""
    import torch

    dtype: torch.dtype = getattr(torch, DTYPE_NAMES[name])
    return dtype


def config_error(msg: str) -> ValueError:
    """The error every config check raises; the prefix says which object rejected the value."""
    return ValueError(f"Invalid EngineConfig: {msg}")


def user_fields(cls: type) -> list[Field[Any]]:
    """The fields of config group ``cls`` a user sets (derived fields are ``init=False``)."""
    return [f for f in fields(cls) if f.init]


def field_choices(cls: type, name: str) -> tuple[str, ...]:
    """The allowed values of field ``name`` of ``cls`` (from its metadata)."""
    meta = next(f.metadata for f in fields(cls) if f.name == name)
    return tuple(meta["choices"])


def check_choice(obj: Any, name: str) -> None:
    """Raise unless field ``name`` of config ``obj`` holds one of its ``choices``."""
    allowed = field_choices(type(obj), name)
    value = getattr(obj, name)
    if value not in allowed:
        raise config_error(f"{name} must be one of {', '.join(allowed)}; got {value!r}.")


def check_at_least(obj: Any, name: str, low: int) -> None:
    """Raise unless field ``name`` of config ``obj`` is None or >= ``low``."""
    value = getattr(obj, name)
    if value is not None and value < low:
        raise config_error(f"{name} must be >= {low}, got {value}.")

"""Base dataclass for attention configs: validated, round-trips through a plain dict (JSON/YAML)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar


@dataclasses.dataclass
class AttentionConfig:
    """Settings every mechanism shares. Subclasses add their own fields and `validate()` checks."""

    name: ClassVar[str] = ""
    dim: int = 768
    heads: int = 12
    dropout: float = 0.0  # attention-probability dropout is not applied; kept for model configs
    bias: bool = True

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def validate(self) -> None:
        _positive_int("dim", self.dim)
        _positive_int("heads", self.heads)
        if self.dim % self.heads:
            raise ValueError(f"heads={self.heads} must divide dim={self.dim} (head_dim = dim / heads)")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["attention"] = self.name
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttentionConfig:
        data = dict(data)
        name = data.pop("attention", cls.name)
        if name != cls.name:
            raise ValueError(f"config is for attention {name!r}, not {cls.name!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TypeError(
                f"unknown config key(s) {unknown} for attention {cls.name!r}; known keys: {sorted(known)}"
            )
        for key, value in data.items():  # JSON turns tuples into lists
            if isinstance(value, list):
                data[key] = tuple(value)
        return cls(**data)


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_positive_int(name: str, value: Any) -> None:
    _positive_int(name, value)


def check_nonnegative_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


class OptionError(ValueError):
    """A malformed KEY=VALUE option; `param` names the command-line flag it came from."""

    def __init__(self, message: str, param: str = "--opt"):
        super().__init__(message)
        self.param = param


def parse_value(text: str) -> Any:
    """'128' -> 128, 'true' -> True, '[1,2]' -> [1, 2], 'null' -> None, anything else stays a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_key_values(items: list[str] | None, param: str = "--opt", example: str = "window=512") -> dict[str, Any]:
    """['window=512', 'causal=true'] -> {'window': 512, 'causal': True}: the command line's repeated
    KEY=VALUE options, values parsed as JSON when they are. A malformed item is an OptionError naming
    `param` and the expected form."""
    options: dict[str, Any] = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise OptionError(f"malformed option {item!r}; expected KEY=VALUE, e.g. {example}", param)
        options[key.strip()] = parse_value(value.strip())
    return options

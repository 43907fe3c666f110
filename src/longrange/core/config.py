"""Base dataclass for attention configs: validated, round-trips through a plain dict (JSON/YAML)."""

from __future__ import annotations

import dataclasses
import json
import warnings
from typing import Any, ClassVar


@dataclasses.dataclass
class AttentionConfig:
    """Settings every mechanism shares. Subclasses add their own fields and `validate()` checks."""

    name: ClassVar[str] = ""
    #: old option name -> new one, still accepted by `from_dict` with a DeprecationWarning (saved configs)
    renamed: ClassVar[dict[str, str]] = {}
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
    def option_defaults(cls) -> dict[str, Any]:
        """Every option beside dim, heads and bias (SHARED_FIELDS), with its default, in declaration order: the one
        home of each default (the bench, LRA presets and conversion only set what differs)."""
        out = {}
        for f in dataclasses.fields(cls):
            if f.name in SHARED_FIELDS:
                continue
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
            else:
                out[f.name] = None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttentionConfig:
        data = dict(data)
        name = data.pop("attention", cls.name)
        if name != cls.name:
            raise ValueError(f"config is for attention {name!r}, not {cls.name!r}")
        for old, new in cls.renamed.items():
            if old in data:
                if new in data:
                    raise TypeError(f"{cls.name}: give {new!r} only ({old!r} is its old name)")
                warnings.warn(f"{cls.name}: option {old!r} is now called {new!r}", DeprecationWarning, stacklevel=3)
                data[new] = data.pop(old)
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


#: fields every mechanism has, set by whoever builds the layer (a model, the bench) rather than per mechanism
SHARED_FIELDS = ("dim", "heads", "bias")


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_positive_int(name: str, value: Any) -> None:
    _positive_int(name, value)


def check_nonnegative_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


class ConfigError(ValueError):
    """A bad setting. `option` names it as the library spells it ("lengths", "mechanisms", "options",
    "steps", ...); the command line turns that into its flag (`longrange.cli.options`)."""

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option


def parse_value(text: str) -> Any:
    """'128' -> 128, 'true' -> True, '[1,2]' -> [1, 2], 'null' -> None, anything else stays a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_key_values(items: list[str] | None, option: str = "options", example: str = "window=512") -> dict[str, Any]:
    """['window=512', 'causal=true'] -> {'window': 512, 'causal': True}: repeated KEY=VALUE settings,
    values parsed as JSON when they are. A malformed item is a ConfigError naming `option`."""
    options: dict[str, Any] = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ConfigError(f"malformed option {item!r}; expected KEY=VALUE, e.g. {example}", option)
        options[key.strip()] = parse_value(value.strip())
    return options


def parse_scoped_key_values(items: list[str] | None, option: str = "options",
                            example: str = "bigbird.block_size=128") -> dict[str, dict[str, Any]]:
    """['bigbird.block_size=128', 'local.window=256'] -> {'bigbird': {'block_size': 128}, 'local': {...}}."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        head, eq, value = item.partition("=")
        name, dot, key = head.partition(".")
        if not eq or not dot or not name.strip() or not key.strip() or not value.strip():
            raise ConfigError(f"malformed option {item!r}; expected MECHANISM.KEY=VALUE, e.g. {example}", option)
        out.setdefault(name.strip(), {})[key.strip()] = parse_value(value.strip())
    return out


def parse_names(text: str | None, option: str) -> tuple[str, ...]:
    """'full, bigbird' -> ('full', 'bigbird'), duplicates dropped, order kept."""
    names = tuple(dict.fromkeys(s.strip() for s in (text or "").split(",") if s.strip()))
    if not names:
        raise ConfigError(f"expected a comma-separated list, got {text!r}", option)
    return names


def parse_lengths(text: str, option: str = "lengths") -> tuple[int, ...]:
    """'1024,2048,4k' -> (1024, 2048, 4096), sorted, duplicates dropped."""
    out = []
    for item in parse_names(text, option):
        scale = 1024 if item.lower().endswith("k") else 1
        try:
            n = int(item[:-1] if scale > 1 else item) * scale
        except ValueError:
            raise ConfigError(f"lengths must be positive integers (e.g. 1024,2048,4k), got {item!r}", option) from None
        if n <= 0:
            raise ConfigError(f"lengths must be positive, got {item!r}", option)
        out.append(n)
    return tuple(sorted(set(out)))

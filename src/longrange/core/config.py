"""Base dataclass for attention configs: validated, round-trips through a plain dict (JSON/YAML)."""

from __future__ import annotations

import dataclasses
import functools
import json
import numbers
import types
import typing
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
    dropout: float = 0.0  # attention-probability dropout in training, where the mechanism defines it (else an error)
    bias: bool = True

    def __post_init__(self) -> None:
        check_field_types(self)
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


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


# -- field types -----------------------------------------------------------------------------------------
def check_field_types(config) -> None:
    """Every dataclass field of `config` against its annotation; a ConfigError naming the first that
    does not fit. The rules: a bool field takes only True / False (never "false" or 1); an int field
    ints, not bools; a float field any real number (made a float); a str field a str; `X | None`
    also None; `tuple[int, ...]` / `list[int]` a tuple or list of ints (made the annotated kind);
    `dict` a dict; `Literal[...]` one of its values. Annotations it does not know (a class, a
    Callable) take instances of that class, or anything. Value ranges and choices stay with each
    config's `validate()`. Numbers are normalised in place (numpy ints -> int, ints -> float)."""
    hints = _field_hints(type(config))
    for f in dataclasses.fields(config):
        if f.name not in hints:
            continue
        value = getattr(config, f.name)
        fits, normalised = _conform(value, hints[f.name])
        if not fits:
            owner = getattr(config, "name", "") or type(config).__name__
            raise ConfigError(f"{owner}: {f.name} must be {_describe(hints[f.name])}, got {value!r} "
                              f"({type(value).__name__})", f.name)
        if normalised is not value:
            object.__setattr__(config, f.name, normalised)


@functools.cache
def _field_hints(cls) -> dict[str, Any]:
    """The resolved annotations of a dataclass (string annotations evaluated; unresolvable: none)."""
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):
        return {}


_NO = (False, None)


def _conform(value, hint) -> tuple[bool, Any]:
    """(whether value fits the annotation, the value normalised to it)."""
    if hint is Any or hint is object:
        return True, value
    if hint is type(None) or hint is None:
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        return (True, value if type(value) is int else int(value)) if ok else _NO
    if hint is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        return (True, value if type(value) is float else float(value)) if ok else _NO
    if hint is str:
        return isinstance(value, str), value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            fits, normalised = _conform(value, arm)
            if fits:
                return True, normalised
        return _NO
    if origin is typing.Literal:
        return value in args, value
    if hint in (tuple, list) or origin in (tuple, list):
        return _conform_sequence(value, origin or hint, args)
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            return _NO
        if len(args) == 2 and not all(_conform(k, args[0])[0] and _conform(v, args[1])[0] for k, v in value.items()):
            return _NO
        return True, value
    if isinstance(hint, type):
        return isinstance(value, hint), value
    return True, value  # Callable, TypeVar, ...: not checked


def _conform_sequence(value, kind: type, args: tuple) -> tuple[bool, Any]:
    """tuple[X, ...] / tuple[X, Y] / list[X] (or bare tuple / list): a tuple or list, items checked."""
    if not isinstance(value, (tuple, list)):
        return _NO
    if not args:
        return True, kind(value)
    if kind is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        if len(args) != len(value):
            return _NO
        items = [_conform(v, a) for v, a in zip(value, args, strict=True)]
    else:
        items = [_conform(v, args[0]) for v in value]
    if not all(fits for fits, _ in items):
        return _NO
    out = kind(v for _, v in items)
    return True, (value if type(value) is kind and all(a is b for a, b in zip(out, value, strict=True)) else out)


def _describe(hint) -> str:
    """An annotation in words: 'a bool (True or False)', 'an int or None', 'a tuple of ints'."""
    names = {bool: "a bool (True or False)", int: "an int", float: "a number", str: "a string",
             type(None): "None", dict: "a dict", list: "a list", tuple: "a tuple"}
    if hint in names:
        return names[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list) and args:
        inner = _describe(args[0]).removeprefix("a ").removeprefix("an ")
        return f"a {origin.__name__} (or list) of {inner}s" if origin is tuple else f"a list of {inner}s"
    if origin is dict:
        return "a dict"
    return f"a {getattr(hint, '__name__', hint)}"


def _takes_bool(hint) -> bool:
    if hint is bool:
        return True
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and bool in typing.get_args(hint)


#: how the command line may spell a bool (any case)
BOOL_WORDS = {"true": True, "false": False, "1": True, "0": False}


def bools_from_text(config_cls: type, options: dict[str, Any], option: str = "options") -> dict[str, Any]:
    """Command-line values for `config_cls`'s bool fields: true / false / 1 / 0 in any case become
    True / False; anything else is a ConfigError naming the key (and `option`, the flag's library
    name). Other keys pass unchanged (the config checks them). `--opt causal=False` -> causal=False."""
    hints = _field_hints(config_cls)
    out = dict(options)
    for key, value in options.items():
        hint = hints.get(key)
        if hint is None or not _takes_bool(hint) or isinstance(value, bool) or value is None:
            continue
        word = str(value).strip().lower() if isinstance(value, (str, int)) else None
        if word not in BOOL_WORDS:
            raise ConfigError(f"{key} takes true or false (or 1 / 0), got {value!r}", option)
        out[key] = BOOL_WORDS[word]
    return out


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

"""Name -> (config dataclass, module class). Filled explicitly by `longrange.mechanisms`."""

from __future__ import annotations

from typing import Any


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, tuple[type, type]] = {}

    def add(self, config_cls: type, module_cls: type) -> None:
        name = config_cls.name
        if not name:
            raise ValueError(f"{config_cls.__name__} has no `name`")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = (config_cls, module_cls)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> tuple[type, type]:
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {self.names()}")
        return self._entries[name]

    def build(self, name: str, **options: Any):
        config_cls, module_cls = self.get(name)
        if options.get("causal") and not module_cls.capabilities.causal:
            causal = [n for n in self.names() if self._entries[n][1].capabilities.causal]
            raise ValueError(f"{self.kind} {name!r} has no causal variant (causal=True); causal ones: {causal}")
        return module_cls(config_cls.from_dict({"attention": name, **options}))

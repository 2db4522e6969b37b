"""The stage contract: a stage kind has a typed config dataclass and a function
`fn(cfg, ctx) -> dict` that returns its outputs (JSON-serialisable, e.g. {"model_path": ...}).

A StageSpec names its function as "module:function", imported the first time the stage runs, so
knowing a kind's config never imports the (heavy) stage module. The runner writes
stage_dir/DONE.json with the outputs, skips a stage whose DONE.json exists, and re-enters an
interrupted one (which resumes from its own last checkpoint).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from omegaconf import MISSING, DictConfig

from r1pipe.errors import ConfigError


@dataclass
class StageConfig:
    """Base of every stage config: `kind` picks the stage implementation and its config class."""

    kind: str = MISSING


@dataclass
class StageContext:
    run_dir: Path
    stage_dir: Path
    recipe: DictConfig  # the whole resolved recipe
    seed: int
    outputs: dict[str, dict] = field(default_factory=dict)  # earlier stages' outputs, by stage name, in run order

    def model_path(self) -> Path:
        """The newest earlier stage output's "model_path", else the recipe's model.path."""
        for outputs in reversed(list(self.outputs.values())):
            if outputs.get("model_path"):
                return Path(outputs["model_path"])
        path = self.recipe.get("model", {}).get("path")
        if not path:
            raise ConfigError("no model: no earlier stage produced a model_path and model.path is not set")
        return Path(path).expanduser()

    def output(self, key: str) -> Any:
        """The newest earlier stage output named `key` (e.g. "heldout_path"), or None."""
        for outputs in reversed(list(self.outputs.values())):
            if outputs.get(key) is not None:
                return outputs[key]
        return None


StageFn = Callable[[Any, StageContext], dict]


@dataclass(frozen=True)
class StageSpec:
    kind: str
    config_cls: type
    target: str | StageFn  # "module:function", or the function itself

    @property
    def fn(self) -> StageFn:
        return self.target if callable(self.target) else load_object(self.target, f"stage {self.kind!r}")


def load_object(spec: str, what: str) -> Any:
    """The object a "module:name" string names (a stage function, an extra reward); `what` names it in errors."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"{what}: {spec!r} is not 'module:name'")
    try:
        return getattr(importlib.import_module(module), name)
    except AttributeError:
        raise ConfigError(f"{what}: module {module} has no {name!r}") from None


_REGISTRY: dict[str, StageSpec] = {}


def _check_config_cls(kind: str, config_cls: type) -> None:
    if not (isinstance(config_cls, type) and hasattr(config_cls, "__dataclass_fields__") and "kind" in config_cls.__dataclass_fields__):
        raise TypeError(f"stage {kind!r}: config class {config_cls!r} must be a dataclass with a `kind` field")


def add_stage(kind: str, config_cls: type, target: str | StageFn) -> None:
    """Register stage `kind`: its config dataclass (with a `kind` field) and "module:function" (or the function)."""
    _check_config_cls(kind, config_cls)
    _REGISTRY[kind] = StageSpec(kind, config_cls, target)


def register_stage(kind: str, config_cls: type) -> Callable[[StageFn], StageFn]:
    """Decorator form of add_stage, for a stage defined outside r1pipe: `fn(cfg: config_cls, ctx) -> dict`."""
    def wrap(fn: StageFn) -> StageFn:
        add_stage(kind, config_cls, fn)
        return fn

    _check_config_cls(kind, config_cls)  # at decoration, not first use
    return wrap


def registered() -> dict[str, StageSpec]:
    return dict(_REGISTRY)

"""Recipes: OmegaConf YAML checked against typed dataclass configs.

A recipe has top-level sections `run`, `cluster`, `model`, `stages` (the order to run) and one
section per stage, whose `kind` picks that stage's config dataclass (see r1pipe.stages). Users
override any value with dot-lists (`rl.rollout.group_size=16 model.path=/ckpt`). Loading merges the YAML
and the overrides onto the structured schema, so a misspelt key or a value of the wrong type is
a ConfigError naming the key before anything runs. So are values no stage could use (an lr that is
not > 0, a NaN anywhere, an unknown model.dtype) and `stage:NAME.KEY` references to a stage that is
not listed before the one that refers to it: `r1pipe run --dry-run` catches all of them. A key that
moved into a section (`rl.lr` -> `rl.optim.lr`) is refused naming its new place (MOVED_KEYS).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from r1pipe.errors import ConfigError
from r1pipe.stages import get_stage
from r1pipe.stages.configs import MOVED_KEYS
from r1pipe.vocab import dtype_name

TOP_LEVEL = ("run", "cluster", "model", "stages")

# a stage config string `stage:NAME.KEY`: output KEY of the earlier stage NAME (r1pipe.run.resolve_stage_refs)
STAGE_REF = re.compile(r"^stage:([A-Za-z_][\w-]*)\.(\w+)$")

__all__ = ["ConfigError", "STAGE_REF", "find_recipe", "load_recipe", "make_config", "recipe_names", "settings", "stage_config",
           "to_yaml", "validate"]


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"  # run directories go to <out_dir>/<name>, relative to the working directory
    seed: int = 0
    # with model.path unset, run this shipped recipe instead (the embedded tiny world), with the
    # same overrides: `r1pipe run r1` is the tiny R1 pipeline, `r1pipe run r1 model.path=/ckpt` the real one
    tiny_recipe: Optional[str] = None


@dataclass
class ClusterConfig:
    address: Optional[str] = None  # None: a local Ray instance; "auto": join a running cluster; "ray://host:port"
    num_cpus: Optional[int] = None  # for a local instance; None = all cores
    num_gpus: Optional[int] = None


@dataclass
class ModelConfigSection:
    preset: str = "tiny"  # ModelConfig.preset name used when a stage builds a model from scratch
    path: Optional[str] = None  # a checkpoint (Hugging Face layout) to start from
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields set over the preset
    fp8: bool = False  # block-scaled FP8 projections (docs/fp8.md)
    fp8_exclude: list[str] = field(default_factory=list)  # fnmatch patterns of module names kept out of FP8
    dtype: str = "float32"  # compute dtype: float32 or bfloat16 (fp32 master weights either way)

    def __post_init__(self) -> None:
        dtype_name(self.dtype)  # raises naming model.dtype


@dataclass
class RecipeBase:
    run: RunConfig = field(default_factory=RunConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    model: ModelConfigSection = field(default_factory=ModelConfigSection)
    stages: list[str] = field(default_factory=list)


def recipe_names() -> list[str]:
    """Recipes shipped in the r1pipe.recipes package."""
    return sorted(p.name[: -len(".yaml")] for p in resources.files("r1pipe.recipes").iterdir() if p.name.endswith(".yaml"))


def find_recipe(name_or_path: str | Path) -> Path:
    """A path to a YAML file, or the name of a shipped recipe ("r1-zero")."""
    p = Path(name_or_path).expanduser()
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"recipe file {str(p)!r} not found")
        return p
    shipped = resources.files("r1pipe.recipes") / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise ConfigError(f"unknown recipe {str(name_or_path)!r}; shipped recipes: {', '.join(recipe_names())} (or give a path to a .yaml)")
    return Path(str(shipped))


def _error(e: OmegaConfBaseException) -> ConfigError:
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return ConfigError(f"{key}: {msg}" if key else msg)


def load_recipe(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Load, override and validate a recipe; returns the resolved, read-only config.

    Raises ConfigError naming the bad key or value.
    """
    path = find_recipe(name_or_path)
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # YAML syntax errors come from yaml, not OmegaConf
        raise ConfigError(f"{path}: cannot parse YAML: {e}") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: a recipe is a mapping of sections, got a {type(raw).__name__}")
    if not raw:
        raise ConfigError(f"{path}: the recipe is empty (it needs `stages` and a section for each stage)")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
    try:
        dotlist = OmegaConf.from_dotlist(list(overrides))
        untyped = OmegaConf.merge(raw, dotlist)
    except OmegaConfBaseException as e:
        raise _error(e) from None
    except Exception as e:  # a value YAML cannot parse, e.g. one starting with '@' or '`'
        raise ConfigError(f"overrides {list(overrides)}: cannot parse a value as YAML ({type(e).__name__}: "
                          f"{str(e).splitlines()[0]}); quote it, e.g. key='\"value\"'") from None
    tiny = (untyped.get("run") or {}).get("tiny_recipe")
    if tiny and not (untyped.get("model") or {}).get("path"):  # the overrides are for the tiny recipe
        if find_recipe(tiny) == path:
            raise ConfigError(f"run.tiny_recipe={tiny!r}: names the recipe itself")
        return load_recipe(tiny, overrides)
    return validate(untyped, dotlist)


def validate(untyped: DictConfig, dotlist: DictConfig | None = None) -> DictConfig:
    """Merge an untyped recipe onto its schema: RecipeBase for the top level and, for each
    section with a `kind`, that kind's stage config class."""
    schema = OmegaConf.structured(RecipeBase)
    OmegaConf.set_struct(schema, False)
    stage_sections: dict[str, str] = {}
    for key in untyped:
        if key in TOP_LEVEL:
            continue
        section = untyped[key]
        if not isinstance(section, DictConfig) or "kind" not in section:
            raise ConfigError(f"{key}: unknown top-level key (expected {', '.join(TOP_LEVEL)} or a stage section with a `kind`)")
        kind = section.kind
        if not isinstance(kind, str):
            raise ConfigError(f"{key}.kind: must be a string, got {kind!r}")
        try:
            cls = get_stage(kind).config_cls
        except KeyError as e:
            raise ConfigError(f"{key}.kind: {e.args[0]}") from None
        _check_moved(section, key, kind)
        schema[key] = OmegaConf.structured(cls)
        stage_sections[key] = kind
    OmegaConf.set_struct(schema, True)
    _open_dict_fields(schema)
    try:
        cfg = OmegaConf.merge(schema, untyped)
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise _error(e) from None
    for i, name in enumerate(cfg.stages):
        if name not in stage_sections:
            raise ConfigError(f"stages[{i}]: stage {name!r} has no section with a `kind` in the recipe")
    if len(set(cfg.stages)) != len(cfg.stages):
        raise ConfigError(f"stages: a stage is listed twice: {list(cfg.stages)}")
    if not cfg.stages:
        raise ConfigError("stages: no stage to run (list the recipe's stage sections in the order to run them)")
    typed: dict[str, Any] = {}
    for name in ("run", "cluster", "model", *stage_sections):
        typed[name] = _to_object(cfg[name], name)
        _check_finite(typed[name], name)
    _check_stage_refs(list(cfg.stages), {name: typed[name] for name in stage_sections})
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _check_moved(section: DictConfig, name: str, kind: str) -> None:
    """A key of stage section `name` that moved into a section since (MOVED_KEYS) is a ConfigError naming
    the new key; recipes and command-line overrides meet the same check (overrides are merged first)."""
    moved = MOVED_KEYS.get(kind, {})
    for key in section:
        if key in moved:
            raise ConfigError(f"{name}.{key}: moved to {' and '.join(f'{name}.{new}' for new in moved[key])}")


def _to_object(node: DictConfig, key: str) -> Any:
    """The typed dataclass of `node` (its own checks, __post_init__, run on the typed values). Nested
    sections are built first, so a failing check is a ConfigError naming the innermost section's key:
    a message that starts with one of the section's fields becomes `key.field...`, any other `key: ...`."""
    for name in node:
        child = node._get_node(name)
        if isinstance(child, DictConfig) and is_dataclass(child._metadata.object_type):
            _to_object(child, f"{key}.{name}")
    try:
        return OmegaConf.to_object(node)
    except (ValueError, TypeError) as e:
        message, cls = str(e), node._metadata.object_type
        first = re.match(r"[A-Za-z_]\w*", message)
        if message.startswith(f"{key}.") or (first and first.group() in {f.name for f in fields(cls)}):
            raise ConfigError(message if message.startswith(f"{key}.") else f"{key}.{message}") from None
        raise ConfigError(f"{key}: {message}") from None
    except OmegaConfBaseException as e:
        raise _error(e) from None


def settings(cfg: Any, key: str = "") -> Iterator[tuple[str, Any, str]]:
    """(dotted key, the dataclass holding it, field name) for every field of dataclass `cfg` that is not
    itself a section, nested sections included (e.g. ("rl.data.train_path", cfg.data, "train_path"))."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        dotted = f"{key}.{f.name}" if key else f.name
        if is_dataclass(value):
            yield from settings(value, dotted)
        else:
            yield dotted, cfg, f.name


def _check_finite(value: Any, key: str) -> None:
    """NaN is never a setting: a ConfigError naming the first key that holds one (dataclass fields,
    dicts and lists are walked)."""
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{key}: NaN is not a usable value")
    if is_dataclass(value):
        for f in fields(value):
            _check_finite(getattr(value, f.name), f"{key}.{f.name}")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{key}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_finite(v, f"{key}[{i}]")


def stage_refs(section: Any, name: str) -> Iterator[tuple[str, str, str]]:
    """(dotted key, value, stage named) of every `stage:NAME.KEY` string field of the typed stage config `name`."""
    for key, holder, field_name in settings(section, name):
        value = getattr(holder, field_name)
        m = STAGE_REF.match(value) if isinstance(value, str) else None
        if m is not None:
            yield key, value, m.group(1)


def _check_stage_refs(stages: list[str], sections: dict[str, Any]) -> None:
    """Every `stage:NAME.KEY` string field of a listed stage names a stage listed before it (which
    outputs the stage has is only known when it has run: r1pipe.run.resolve_stage_refs checks that)."""
    for i, name in enumerate(stages):
        for key, value, ref in stage_refs(sections[name], name):
            if ref in stages[:i]:
                continue
            if ref in stages:
                why = f"stage {ref!r} runs after {name!r}"
            elif ref in sections or ref in TOP_LEVEL:
                why = f"{ref!r} is not a stage listed before {name!r}"
            else:
                why = f"the recipe has no stage {ref!r}"
            earlier = ", ".join(stages[:i]) or "none"
            raise ConfigError(f"{key}={value!r}: {why} (stages before it: {earlier})")


def _open_dict_fields(node: DictConfig) -> None:
    """Fields typed dict[str, ...] (e.g. model.overrides) take any key; dataclass fields stay strict."""
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            if child._metadata.object_type in (None, dict):
                OmegaConf.set_struct(child, False)
            else:
                _open_dict_fields(child)


def make_config(cls: type, values: dict[str, Any] | None = None, name: Optional[str] = None) -> Any:
    """A stage config of class `cls` with `values` keyed as in a recipe section, dotted keys reaching into
    its sections ({"rollout.group_size": 4, "optim": {"lr": 1e-2}}), checked as a recipe's section
    `name` (default: its kind) would be: a ConfigError naming the key otherwise. A value given for a
    dict or list field replaces the default whole."""
    node = OmegaConf.structured(cls)
    name = name or node.kind
    _open_dict_fields(node)
    _check_moved(OmegaConf.create({key.split(".")[0]: None for key in values or {}}), name, node.kind)
    try:
        for key, value in _leaves(node, values or {}):
            OmegaConf.update(node, key, value, merge=False)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{name}.{_error(e)}") from None
    return _to_object(node, name)


def _leaves(node: DictConfig, values: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) pairs of `values`, a mapping given for a section (a dataclass) split key by key."""
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        target = OmegaConf.select(node, dotted, default=None, throw_on_missing=False)
        if isinstance(value, dict) and isinstance(target, DictConfig) and is_dataclass(target._metadata.object_type):
            yield from _leaves(node, value, f"{dotted}.")
        else:
            yield dotted, value


def stage_config(cfg: DictConfig, name: str) -> Any:
    """The typed dataclass instance of stage section `name`."""
    return OmegaConf.to_object(cfg[name])


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)

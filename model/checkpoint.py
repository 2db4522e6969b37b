"""Checkpoint I/O in the Hugging Face layout: sharded safetensors + model.safetensors.index.json + config.json.

Loading builds the model on the meta device and fills it tensor by tensor, shard by shard, so no second copy of
the weights is ever held. Official FP8 checkpoints (float8_e4m3fn weights + `weight_scale_inv` per 128x128 block)
are dequantized on load unless the receiving module itself keeps FP8 weights (an FP8 linear with weight_scale_inv).
"""
from __future__ import annotations

import json
import logging
import re
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .config import ModelConfig
from .expert_parallel import ExpertShard, experts_held_elsewhere, hold_local_experts
from .experts import GroupedExperts
from .rope import rope_inv_freq
from .transformer import Transformer

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"  # "<name>.weight_scale_inv" holds the inverse scales of "<name>.weight"


def dequantize_blocks(weight: Tensor, scale_inv: Tensor, block: tuple[int, int] = (128, 128),
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """FP8 weight [out,in] times its per-block inverse scales [ceil(out/bo), ceil(in/bi)] -> dtype."""
    out_f, in_f = weight.shape
    s = scale_inv.float().repeat_interleave(block[0], 0)[:out_f].repeat_interleave(block[1], 1)[:, :in_f]
    return (weight.float() * s).to(dtype)


def _weight_files(path: Path) -> dict[str, Path]:
    """tensor name -> file holding it."""
    if (path / INDEX).exists():
        with open(path / INDEX) as f:
            return {k: path / v for k, v in json.load(f)["weight_map"].items()}
    single = path / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{path}: neither {INDEX} nor model.safetensors")
    with safe_open(single, "pt") as f:
        return {k: single for k in f.keys()}


EXPERT_KEY = re.compile(r"^(?P<experts>.+\.experts)\.(?P<j>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.(?P<attr>weight(?:_scale_inv)?)$")


def _expert_target(model: nn.Module, key: str) -> tuple[GroupedExperts, str, int] | None:
    """A per-expert Hugging Face key -> (stacked experts module, stacked attribute, index in the stack); None
    for a key the model has no place for, or an expert another expert-parallel rank holds."""
    m = EXPERT_KEY.match(key)
    if m is None:
        return None
    try:
        module = model.get_submodule(m["experts"])
    except AttributeError:
        return None
    j = int(m["j"])
    if not isinstance(module, GroupedExperts) or j not in module.held_experts:
        return None
    return module, m["proj"] + ("" if m["attr"] == "weight" else SCALE_SUFFIX), j - module.first_expert


def _write_expert(target: tuple[GroupedExperts, str, int], value: Tensor, name: str) -> None:
    """Copy one expert's [out, in] tensor into its slice of the stack (materialising a meta stack first)."""
    module, attr, j = target
    stacked = getattr(module, attr)
    if tuple(stacked.shape[1:]) != tuple(value.shape):
        raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)} != model {tuple(stacked.shape[1:])}")
    if stacked.is_meta or stacked.dtype != value.dtype or stacked.device != value.device:
        _assign(module, attr, torch.zeros(stacked.shape, dtype=value.dtype, device=value.device))
    getattr(module, attr).data[j].copy_(value)


def _get_submodule_and_attr(model: nn.Module, key: str) -> tuple[nn.Module, str] | None:
    module_name, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    if attr in module._parameters or attr in module._buffers:
        return module, attr
    return None


def _assign(module: nn.Module, attr: str, value: Tensor) -> None:
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else True)
    else:
        module._buffers[attr] = value


def _shared_aliases(model: nn.Module) -> dict[str, str]:
    """Every state-dict key -> the first key naming the same tensor (MTP's embed_tokens / shared_head.head)."""
    first: dict[int, str] = {}
    alias: dict[str, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        alias[name] = first.setdefault(id(t), name)
    return alias


def load_pretrained(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    config: ModelConfig | None = None, fp8_weights: bool = False,
                    expert_shard: ExpertShard | None = None) -> Transformer:
    """Load a DeepSeek-V3 checkpoint directory (HF layout). device='meta' builds the shape without reading weights.

    expert_shard: one process of an expert-parallel engine; every MoE layer holds and reads only the routed
    experts of the shard's rank (expert_parallel.hold_local_experts), the other experts' tensors stay unread.

    fp8_weights=True (inference): projections become FP8Linear (config.fp8, fp8_exclude still applies) and
    float8 checkpoint weights stay float8_e4m3fn with their weight_scale_inv blocks, computed through the
    block-scaled GEMM without dequantizing (about half the weight memory of bf16).
    """
    path = Path(path)
    config = config or ModelConfig.from_pretrained(path)
    if fp8_weights:
        config.fp8 = True
    with torch.device("meta"):
        model = Transformer(config)
    if expert_shard is not None:
        hold_local_experts(model, expert_shard)
    if str(device) == "meta":
        return model.to(dtype)
    block = tuple((config.quantization_config or {}).get("weight_block_size", (128, 128)))
    aliases = _shared_aliases(model)
    elsewhere = experts_held_elsewhere(model)
    files = _weight_files(path)
    loaded: set[str] = set()
    skipped: list[str] = []
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    dequantized_any = False
    with ExitStack() as stack:
        handles: dict[Path, object] = {}

        def open_file(file: Path):
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(file, "pt", device="cpu"))
            return handles[file]

        for file, names in sorted(by_file.items()):
            handle = open_file(file)
            for name in names:
                if name.endswith(SCALE_SUFFIX) or name in elsewhere:
                    continue  # a scale: consumed with its weight below; another expert-parallel rank's expert
                expert = _expert_target(model, name)
                target = _get_submodule_and_attr(model, name) if expert is None else (expert[0], expert[1])
                if target is None:
                    skipped.append(name)
                    continue
                module, attr = target
                tensor = handle.get_tensor(name)
                scale_name = name + SCALE_SUFFIX
                keeps_fp8 = fp8_weights and (expert is not None or attr == "weight") and hasattr(module, "load_fp8_weight")
                if tensor.dtype == torch.float8_e4m3fn:
                    if scale_name not in files:
                        raise ValueError(f"{name} is float8 but {scale_name} is missing from the checkpoint")
                    scale = open_file(files[scale_name]).get_tensor(scale_name)
                    if keeps_fp8 and block == (128, 128):
                        if expert is not None:  # checks both shapes
                            module.load_fp8_weight(attr, expert[0].first_expert + expert[2], tensor.to(device), scale.to(device))
                        else:
                            module.load_fp8_weight(tensor.to(device), scale.to(device))
                        loaded.add(aliases.get(name, name))
                        continue
                    tensor = dequantize_blocks(tensor, scale, block, dtype)
                    dequantized_any = True
                elif tensor.is_floating_point() and tensor.dtype != torch.float8_e4m3fn:
                    keep_fp32 = attr == "e_score_correction_bias" or attr.endswith(SCALE_SUFFIX)
                    tensor = tensor.to(torch.float32 if keep_fp32 else dtype)
                if expert is not None:
                    _write_expert(expert, tensor.to(device), name)
                    loaded.add(aliases.get(name, name))
                    continue
                old = getattr(module, attr)
                if tuple(old.shape) != tuple(tensor.shape):
                    raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(old.shape)}")
                _assign(module, attr, tensor.to(device))
                loaded.add(aliases.get(name, name))
    if skipped:
        log.warning("ignored %d checkpoint tensors the config has no place for, e.g. %s", len(skipped), skipped[:3])
    _finish(model, config, loaded, aliases, dtype, device)
    if dequantized_any:
        config.quantization_config = None  # the weights in memory are no longer FP8
    return model


def _finish(model: Transformer, config: ModelConfig, loaded: set[str], aliases: dict[str, str],
            dtype: torch.dtype, device: str | torch.device) -> None:
    """Rebuild non-persistent buffers; initialise MTP weights a checkpoint lacks (e.g. saved by transformers)."""
    missing = sorted({aliases[k] for k in aliases} - loaded)
    mtp_prefixes = tuple(f"model.layers.{config.num_hidden_layers + k}." for k in range(config.num_nextn_predict_layers))
    not_mtp = [k for k in missing if not k.startswith(mtp_prefixes)]
    if not_mtp:
        raise ValueError(f"checkpoint lacks {len(not_mtp)} tensors, e.g. {not_mtp[:5]}")
    if missing:
        log.warning("checkpoint has no MTP weights (%d tensors): initialising them fresh", len(missing))
    generator = torch.Generator().manual_seed(0)
    std = config.initializer_range
    for key in missing:
        expert = _expert_target(model, key)
        if expert is not None:
            shape = getattr(expert[0], expert[1]).shape[1:]
            value = torch.empty(shape).normal_(0.0, std, generator=generator)
            _write_expert(expert, value.to(dtype).to(device), key)
            continue
        module, attr = _get_submodule_and_attr(model, key)  # type: ignore[misc]
        old = getattr(module, attr)
        if re.search(r"norm\.weight$", key):
            value = torch.ones(old.shape)
        elif attr in ("bias", "e_score_correction_bias"):
            value = torch.zeros(old.shape)
        else:
            value = torch.empty(old.shape).normal_(0.0, std, generator=generator)
        _assign(module, attr, value.to(torch.float32 if attr == "e_score_correction_bias" else dtype).to(device))
    if config.tie_word_embeddings:  # assignment replaced the tied Parameter: tie again
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rope_inv_freq = rope_inv_freq(config)[0].to(device)
    for moe in model.moe_layers():
        moe.expert_load = torch.zeros(config.n_routed_experts, device=device)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", size.upper().replace("IB", "iB"))
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or e.g. '2GB'")
    unit = {None: 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[m.group(2)]
    return int(float(m.group(1)) * unit)


def save_pretrained(model: Transformer, path: str | Path, max_shard_size: int | str = "2GB") -> None:
    """Write config.json, model-0000i-of-0000n.safetensors shards and model.safetensors.index.json."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(max_shard_size)
    state = model.state_dict()
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        seen: set[int] = set()
        tensors: dict[str, Tensor] = {}
        for name in names:
            t = state[name].detach().to("cpu").contiguous()
            if t.data_ptr() in seen:  # shared tensors (MTP's embedding/head) are stored as their own copies
                t = t.clone()
            seen.add(t.data_ptr())
            tensors[name] = t
            weight_map[name] = file
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        del tensors
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(path / INDEX, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    config = model.config
    dtypes = {t.dtype for n_, t in state.items() if t.is_floating_point() and "e_score_correction_bias" not in n_}
    if len(dtypes) == 1:
        config.torch_dtype = str(next(iter(dtypes))).removeprefix("torch.")
    config.save(path)


__all__ = ["load_pretrained", "save_pretrained", "dequantize_blocks"]

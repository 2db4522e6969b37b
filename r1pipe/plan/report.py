"""Each stage's placement, whether its devices hold what they must, the smallest layout that does, and the text.

A stage fits in a precision when every GPU role's bytes per device are within its share of `--gpu-memory`
(a worker asking a fraction of a GPU gets that fraction) and its workers fit on the nodes. When it does
not, the smallest layout is searched per role (r1pipe.plan.layout): trainers by more workers (a node's
worth at a time), a larger ep_size and offload (none, the optimizer state, also the fp32 masters and
gradients); engines by a larger ep_size, each rollout worker count rounded up to whole engines. Where
offload is needed the smallest layout without it is given too; where nothing fits, what is left on a
device at the largest layout and the recipe keys that shrink it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .layout import (
    MAX_NODES, EngineLayout, Role, Slot, TrainerLayout, divisors, nodes_needed, place, smallest_engine, smallest_trainer,
)
from .memory import GiB, Memory, engine_memory, trainer_memory
from .stages import RolePlan, StageInfo

PRECISIONS = {"bf16": "bf16", "fp8": "FP8"}
ROWS = (("parameters", "parameters"), ("gradients", "grads"), ("optimizer", "optimizer"),
        ("frozen model", "frozen"), ("activations", "activations"), ("KV cache", "kv_cache"), ("total", "total"))


@dataclass
class StagePlan:
    info: StageInfo
    gpus_per_node: int
    budget: float  # bytes per GPU
    nodes: int  # the nodes the stage is planned on (--nodes, else the fewest that hold its workers)
    needed: int  # the fewest nodes that hold its workers
    placement: list[list[Slot]] | None
    fits: dict[str, bool] = field(default_factory=dict)  # precision -> every role fits and the nodes hold it
    layouts: dict[str, list[str]] = field(default_factory=dict)  # precision -> the smallest layout, in words


def plan_stage(info: StageInfo, gpus_per_node: int, gpu_memory_gib: float, nodes: int | None) -> StagePlan:
    """Placement, fit decision per precision, and the smallest layout where it does not fit."""
    roles = [Role(r.role, r.workers, r.gpus) for r in info.roles]
    needed = nodes_needed(roles, gpus_per_node) if roles else 0
    on = nodes if nodes is not None else needed
    p = StagePlan(info, gpus_per_node, gpu_memory_gib * GiB, on, needed,
                  place(roles, on, gpus_per_node, info.strategy) if roles else [])
    for precision in (info.roles[0].memory if info.roles else {}):
        fits_nodes = p.placement is not None
        p.fits[precision] = fits_nodes and all(r.memory[precision].total <= _budget(p, r) for r in info.roles)
        if not p.fits[precision]:
            p.layouts[precision] = smallest_layout(p, precision)
    return p


def _budget(p: StagePlan, r: RolePlan) -> float:
    return p.budget * min(r.gpus, 1.0)


def smallest_layout(p: StagePlan, precision: str) -> list[str]:
    """The smallest layout that fits, in words (module docstring)."""
    fp8 = precision == "fp8"
    roles, parts, failed = [], [], []
    for r in p.info.roles:
        found = _trainer_search(p, r, fp8) if r.trainer is not None else _engine_search(p, r, fp8)
        if isinstance(found, str):
            failed.append(found)
            continue
        roles.append(Role(r.role, found.workers, r.gpus))
        parts.append(found)
    if failed:  # what does fit is still worth saying
        return failed + [x.text for x in parts]
    lines = [f"{nodes_needed(roles, p.gpus_per_node)} node(s): " + "; ".join(x.text for x in parts)]
    for i, x in enumerate(parts):
        if x.plain is not None:  # the trainer offloads at the fewest nodes: the fewest without offload
            alt = [Role(q.name, x.plain.workers if j == i else q.workers, q.gpus) for j, q in enumerate(roles)]
            lines.append(f"without offload: {nodes_needed(alt, p.gpus_per_node)} node(s): {x.plain.text}")
    return lines


@dataclass(frozen=True)
class Found:
    """One role's layout in the smallest layout: its workers and how it is said; `plain`: the same without offload."""

    workers: int
    text: str
    plain: "Found | None" = None


def _relaxations(r: RolePlan) -> list[tuple[str, RolePlan]]:
    """The trainer as the recipe has it, then with a micro-batch of one sequence, then also with activation
    checkpointing: (the overrides in words, the role so changed)."""
    out = [("", r)]
    shrink = r.micro_rows > 1 and r.trainer.rows > 1
    base = replace(r, micro_rows=1, trainer=replace(r.trainer, rows=1)) if shrink else r
    if shrink:
        out.append((f"with {r.micro_key}=1: ", base))
    if not r.trainer.activation_checkpointing:
        key = r.key.replace(".resources.trainer", ".parallelism.activation_checkpointing")
        out.append((f"with {r.micro_key}=1 {key}=true: " if shrink else f"with {key}=true: ",
                    replace(base, trainer=replace(base.trainer, activation_checkpointing=True))))
    return out


def _trainer_search(p: StagePlan, r: RolePlan, fp8: bool) -> Found | str:
    for words, relaxed in _relaxations(r):
        found = _trainer_layouts(p, relaxed, fp8)
        if found is not None:
            best, plain = found
            text = words + _describe_trainer(p, relaxed, best)
            return Found(best.workers, text, Found(plain.workers, words + _describe_trainer(p, relaxed, plain))
                         if plain is not None and plain is not best else None)
    return _trainer_floor(p, _relaxations(r)[-1][1], fp8)


def _trainer_bytes(p: StagePlan, r: RolePlan, fp8: bool):
    model = p.info.model

    def bytes_for(workers: int, ep_size: int, offload: str) -> float:
        return trainer_memory(model, _at(r, workers, ep_size, offload), fp8).total
    return bytes_for


def _at(r: RolePlan, workers: int, ep_size: int, offload: str):
    """The role's TrainerSetup at another worker count, ep_size and offload (the per-worker micro-batch follows)."""
    rows = min(r.micro_rows, math.ceil(r.batch_rows / workers))
    return replace(r.trainer, workers=workers, ep_size=ep_size, offload=offload, rows=rows)


def _trainer_layouts(p: StagePlan, r: RolePlan, fp8: bool) -> tuple[TrainerLayout, TrainerLayout | None] | None:
    """(the smallest layout, the smallest without offload or None when none fits), or None."""
    step = max(1, int(p.gpus_per_node / r.gpus))
    others = [Role(q.role, q.workers, q.gpus) for q in p.info.roles if q.role != r.role]
    nodes_for = lambda w: nodes_needed([Role(r.role, w, r.gpus), *others], p.gpus_per_node)  # noqa: E731
    args = (_trainer_bytes(p, r, fp8), _budget(p, r), r.workers, r.ep_size, step, p.info.model.n_routed_experts,
            nodes_for)
    best = smallest_trainer(*args)
    if best is None:
        return None
    return best, (best if best.offload == "none" else smallest_trainer(*args, offloads=("none",)))


def _trainer_floor(p: StagePlan, r: RolePlan, fp8: bool) -> str:
    """What a device still holds at the largest layout searched, and the longest micro-batch that would fit."""
    workers = MAX_NODES * int(p.gpus_per_node / r.gpus)
    n = p.info.model.n_routed_experts
    ep = max(divisors(math.gcd(n, workers))) if n else 1
    m = trainer_memory(p.info.model, _at(r, workers, ep, "parameters"), fp8)
    tokens = r.trainer.rows * r.trainer.seq_len
    room = _budget(p, r) - (m.total - m.activations)
    fit = int(room / (m.activations / tokens)) if room > 0 else 0
    longest = (f"a micro-batch of at most {fit} tokens would fit" if fit else
               "no micro-batch fits beside the weights")
    return (f"trainer: no layout up to {MAX_NODES} nodes fits, even with {r.micro_key}=1 and activation checkpointing: "
            f"with {workers} workers, ep_size {ep} and parameter offload a device holds {_gib(m.total)} GiB, "
            f"{_gib(m.activations)} of them the activations of {tokens} tokens ({longest}; r1pipe splits neither "
            "sequences nor layers across devices)")


def _describe_trainer(p: StagePlan, r: RolePlan, t: TrainerLayout) -> str:
    offload = {"none": "", "optimizer": ", optimizer state offloaded to host memory",
               "parameters": ", fp32 masters, gradients and optimizer state offloaded to host memory"}[t.offload]
    host = ""
    if t.offload != "none":
        m = trainer_memory(p.info.model, _at(r, t.workers, t.ep_size, t.offload))
        host = f"; {_gib(m.host * min(t.workers, int(p.gpus_per_node / r.gpus)))} GiB of host memory per node"
    return f"trainer {t.workers} workers, ep_size {t.ep_size}{offload} ({_gib(t.bytes)} GiB per device{host})"


def _engine_search(p: StagePlan, r: RolePlan, fp8: bool) -> Found | str:
    """The smallest engine ep_size that holds the recipe's max_num_seqs; else the smallest at which one sequence
    fits, with the max_num_seqs that fit there (and at the largest ep_size)."""
    model, setup = p.info.model, r.engine
    budget = _budget(p, r)
    experts = model.n_routed_experts if r.engine_key else 0  # a stage without engine options has no ep_size
    at = lambda ep: engine_memory(model, replace(setup, ep_size=ep), fp8)  # noqa: E731
    found = smallest_engine(lambda ep: at(ep).total, budget, r.workers, r.ep_size, experts)
    if found is not None:
        return Found(found.workers, _describe_engine(found, at(found.ep_size)))
    per_seq = at(r.ep_size).kv_cache / setup.max_num_seqs

    def seqs(ep: int) -> int:
        m = at(ep)
        return int((budget - m.working - m.activations) // per_seq)
    one = smallest_engine(lambda ep: budget - seqs(ep) * per_seq if seqs(ep) >= 1 else math.inf, budget, r.workers,
                          r.ep_size, experts)
    largest = max(divisors(experts)) if experts else 1
    if one is None:
        m = at(largest)
        where = f"even at ep_size {largest}" if r.engine_key else "on one GPU (this stage's engines take no ep_size)"
        return f"rollout: {where} the weights and activations take {_gib(m.working + m.activations)} GiB per device"
    n = seqs(one.ep_size)
    setting = f"with {r.engine_key}.max_num_seqs={n}" if r.engine_key else f"with engines of max_num_seqs {n}"
    more = f"; ep_size {largest} holds {seqs(largest)} sequences" if largest != one.ep_size else ""
    m = engine_memory(model, replace(setup, ep_size=one.ep_size, max_num_seqs=n), fp8)
    return Found(one.workers, f"{setting}: {_describe_engine(one, m)}{more}")


def _describe_engine(e: EngineLayout, m: Memory) -> str:
    return (f"rollout {e.workers} workers as {e.workers // e.ep_size} engine(s) of ep_size {e.ep_size} "
            f"({_gib(m.total)} GiB per device, {_gib(m.kv_cache)} of them KV cache)")


def _gib(n: float) -> str:
    return f"{n / GiB:,.1f}"


def _cell(m: Memory, name: str) -> float:
    return getattr(m, name)


def render(plans: list[StagePlan], header: list[str]) -> str:
    lines = list(header)
    for p in plans:
        lines += [""] + render_stage(p)
    return "\n".join(lines)


def render_stage(p: StagePlan) -> list[str]:
    info = p.info
    model = f": {info.model.name}" if info.model is not None and info.roles else ""
    out = [f"stage {info.name} ({info.kind}){model}"]
    if not info.roles:
        return out + ["  no GPU workers" + (f" (names the model later stages use: {info.model.name})"
                                             if info.kind == "teacher" and info.model is not None else "")]
    for r in info.roles:
        out.append(f"  {r.role:<8} {r.key}: {r.workers} x {r.gpus:g} GPU; {r.detail}")
    for role, workers in info.cpu_workers:
        out.append(f"  {role:<8} {workers} worker(s) on CPU")
    if p.placement is None:
        out.append(f"  placement: the workers need {p.needed} node(s) of {p.gpus_per_node} GPUs, more than {p.nodes}")
    else:
        nodes = " | ".join(f"node {i}: {_slots(slots)}" for i, slots in enumerate(p.placement) if slots)
        out.append(f"  placement ({info.strategy}, {p.nodes} node(s) of {p.gpus_per_node} GPUs): {nodes}")
    precisions = list(info.roles[0].memory)
    head = "".join(f"{r.role + ' ' + PRECISIONS[q]:>16}" for r in info.roles for q in precisions)
    out.append(f"  {'GiB per device':<14}{head}")
    for label, name in ROWS:
        values = [_cell(r.memory[q], name) for r in info.roles for q in precisions]
        if label == "frozen model" and not any(values):
            continue
        out.append(f"  {label:<14}" + "".join(f"{_gib(v):>16}" for v in values))
    verdict = ", ".join(f"{PRECISIONS[q]} {'yes' if p.fits[q] else 'no'}" for q in precisions)
    runs = ", ".join(f"{r.role} {PRECISIONS.get(r.recipe_precision, r.recipe_precision)}" for r in info.roles)
    out.append(f"  fits in {p.budget / GiB:g} GiB per GPU: {verdict} (the recipe runs {runs})")
    for q, lines in p.layouts.items():
        out.append(f"  smallest layout that fits, {PRECISIONS[q]}: {lines[0]}")
        out += [f"    {line}" for line in lines[1:]]
    out += [f"  note: {n}" for n in info.notes]
    return out


def _slots(slots: list[Slot]) -> str:
    """A node's workers by role, runs of consecutive ones as ranges: "trainer 0-3, rollout 0,2,4"."""
    by_role: dict[str, list[int]] = {}
    for slot in slots:
        by_role.setdefault(slot.role, []).extend(range(slot.first, slot.first + slot.count))
    parts = []
    for role, ids in by_role.items():
        runs, start = [], ids[0]
        for a, b in zip(ids, ids[1:] + [None]):
            if b != a + 1:
                runs.append(f"{start}" if start == a else f"{start}-{a}")
                start = b
        parts.append(f"{role} {','.join(runs)}")
    return ", ".join(parts)

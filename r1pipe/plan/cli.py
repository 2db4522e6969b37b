"""`r1pipe plan RECIPE [key=value ...] [--gpus-per-node 8] [--gpu-memory 80] [--nodes N] [--prompt-tokens 1024]`:
for each stage of a recipe, its workers and their placement, the bytes each device holds (parameters,
gradients, optimizer state, activations, KV cache; in bf16 and with FP8 projections), whether that fits in
the GPUs' memory, and if not, the smallest layout that does. Reads configs only: no weights, no Ray, no GPU.
"""
from __future__ import annotations

import argparse

from r1pipe.config import recipe_names
from r1pipe.errors import ConfigError

from .report import plan_stage, render
from .stages import load, plan_stages


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help=f"a shipped recipe ({', '.join(recipe_names())}) or a path to a recipe .yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dot-list overrides as for `r1pipe run`, e.g. model.preset=v3-16b-a3b "
                             "reasoning_rl.parallelism.ep_size=8 reasoning_rl.rollout.engine.ep_size=8")
    parser.add_argument("--gpus-per-node", default="8", help="GPUs per node (default 8)")
    parser.add_argument("--gpu-memory", default="80", help="memory per GPU in GiB (default 80)")
    parser.add_argument("--nodes", default=None, help="nodes to plan each stage on (default: the fewest that hold "
                                                      "its workers)")
    parser.add_argument("--prompt-tokens", default="1024",
                        help="prompt length assumed for sampling and RL sequences (default 1024): recipes bound "
                             "the completion (max_tokens), not the prompt")


def number(flag: str, value: str, kind: type = int, minimum: float = 1) -> int | float:
    """The value of `flag` as a `kind` >= minimum; a ConfigError naming the flag otherwise."""
    try:
        n = kind(value)
    except (TypeError, ValueError):
        n = None
    if n is None or not n >= minimum or n != n or n == float("inf"):
        raise ConfigError(f"{flag}={value!r}: expected {'an integer' if kind is int else 'a number'} >= {minimum:g}")
    return n


def main(args: argparse.Namespace) -> int:
    gpus_per_node = number("--gpus-per-node", args.gpus_per_node)
    gpu_memory = number("--gpu-memory", args.gpu_memory, float, minimum=0.001)
    nodes = None if args.nodes is None else number("--nodes", args.nodes)
    prompt_tokens = number("--prompt-tokens", args.prompt_tokens, minimum=0)
    cfg = load(args.recipe, args.overrides)
    stages = plan_stages(cfg, prompt_tokens)
    plans = [plan_stage(s, gpus_per_node, gpu_memory, nodes) for s in stages]
    flags = f" --gpus-per-node {gpus_per_node} --gpu-memory {gpu_memory:g}" + (f" --nodes {nodes}" if nodes else "")
    where = f"{nodes} node(s)" if nodes is not None else "the fewest nodes per stage"
    header = [f"r1pipe plan {args.recipe}{''.join(' ' + o for o in args.overrides)}{flags}",
              f"{where} of {gpus_per_node} GPUs with {gpu_memory:g} GiB each; prompts of {prompt_tokens} tokens; "
              "GiB = 2^30 bytes, per device, before the CUDA context and allocator slack"]
    print(render(plans, header))
    return 0

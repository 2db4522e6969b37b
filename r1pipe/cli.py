"""The `r1pipe` console script.

Each command lives in the module that owns it; this file only maps command words to modules
and imports a module when its command runs, so `r1pipe model info` never pays for Ray.
A command module provides `add_arguments(parser)` and `main(args) -> int | None`.

Every command takes `--debug`. Errors end the same way for all of them (r1pipe.errors.explain): a
user error (r1pipe.errors.UserError, also when raised inside a Ray actor) is one or two lines on
stderr and exit status 2; any other exception is one line and status 1; Ctrl-C is status 130 and
SIGTERM 143, after the same clean-up. `--debug` prints the traceback as well.
"""
from __future__ import annotations

import argparse
import importlib
import signal
import sys
import traceback
from types import ModuleType

import r1pipe
from r1pipe.errors import Terminated, explain

# (command words, module, one-line help)
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("model", "info"), "r1pipe.model.info", "parameter counts, KV-cache and weight memory of a preset or checkpoint"),
    (("model", "init"), "r1pipe.causal_lm", "a freshly initialised model (V3 or dense preset) around a tokenizer, no download"),
    (("run",), "r1pipe.run", "run a recipe (a shipped one such as r1-zero, or a .yaml path) with key=value overrides"),
    (("plan",), "r1pipe.plan.cli", "memory per GPU and placement of a recipe's stages, and the smallest layout that fits"),
    (("eval",), "r1pipe.eval.cli", "evaluate a model or saved generations on math and code suites"),
    (("sandbox", "check"), "r1pipe.rewards.sandbox", "which code-sandbox isolation is active here, probed from inside"),
]


def usage() -> str:
    lines = [f"r1pipe {r1pipe.__version__}: R1-style reasoning RL on DeepSeek-V3", "", "commands:"]
    lines += [f"  r1pipe {' '.join(words):<12} {help_text}" for words, _, help_text in COMMANDS]
    lines += ["", "`r1pipe COMMAND --help` for a command's options."]
    return "\n".join(lines)


def command_for(argv: list[str]) -> tuple[argparse.ArgumentParser, ModuleType, list[str]] | None:
    """The parser and module of the command `argv` starts with, and the arguments after its words;
    None when it names no command."""
    for words, module_name, help_text in COMMANDS:
        if tuple(argv[: len(words)]) == words:
            prog = "r1pipe " + " ".join(words)
            parser = argparse.ArgumentParser(prog=prog, description=help_text)
            parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
            module = importlib.import_module(module_name)
            module.add_arguments(parser)
            return parser, module, argv[len(words):]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = command_for(argv)
    if command is not None:
        parser, module, rest = command
        # options and positionals in any order (`r1pipe run r1-zero --dry-run key=value`)
        return run_command(parser.prog, module.main, parser.parse_intermixed_args(rest))
    if argv in ([], ["-h"], ["--help"]):
        print(usage())
        return 0
    if argv == ["--version"]:
        print(f"r1pipe {r1pipe.__version__}")
        return 0
    print(f"r1pipe: unknown command {' '.join(argv[:2])!r}\n\n{usage()}", file=sys.stderr)
    return 2


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def _stop_ray() -> None:
    """Shut down the Ray instance this process started or joined, if any (Ray is never imported here)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            ray.shutdown()
        except (Exception, KeyboardInterrupt):  # a second Ctrl-C during shutdown: the report still follows
            pass


def run_command(prog: str, command, args: argparse.Namespace) -> int:
    """`command(args)`, with any exception it raises reported as r1pipe.errors.explain says (and its
    traceback under args.debug); SIGTERM is turned into r1pipe.errors.Terminated meanwhile."""
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(command(args) or 0)
    except (Exception, KeyboardInterrupt, Terminated) as e:
        if getattr(args, "debug", False):
            traceback.print_exc()
        _stop_ray()  # before the report, so that nothing Ray's workers still print comes after it
        explained = explain(e, prog)
        for line in explained.lines:
            print(line, file=sys.stderr)
        return explained.status
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())

"""The `r1pipe` console script.

Each command lives in the module that owns it; this file only maps command words to modules
and imports a module when its command runs, so `r1pipe model info` never pays for Ray.
A command module provides `add_arguments(parser)` and `main(args) -> int | None`.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

import r1pipe

# (command words, module, one-line help)
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("model", "info"), "r1pipe.model.info", "parameter counts, KV-cache and weight memory of a preset or checkpoint"),
    (("model", "init"), "r1pipe.causal_lm", "a freshly initialised model (V3 or dense preset) around a tokenizer, no download"),
    (("run",), "r1pipe.run", "run a recipe (a shipped one such as r1-zero, or a .yaml path) with key=value overrides"),
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
            parser = argparse.ArgumentParser(prog="r1pipe " + " ".join(words), description=help_text)
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
        return int(module.main(parser.parse_intermixed_args(rest)) or 0)
    if argv in ([], ["-h"], ["--help"]):
        print(usage())
        return 0
    if argv == ["--version"]:
        print(f"r1pipe {r1pipe.__version__}")
        return 0
    print(f"r1pipe: unknown command {' '.join(argv[:2])!r}\n\n{usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

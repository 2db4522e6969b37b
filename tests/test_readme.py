"""The README and the docs promise only what ships.

Every `r1pipe ...` command in a README code block parses and passes its own checks (run in-process
with `--dry-run`, which loads and validates the recipe or the eval arguments and runs nothing; `model
info` runs as is, it only reads a config); every recipe, stage kind, file and docs link the README
names exists; its commands table and layout match the CLI and the tree; CI runs the README's set-up
and test commands. A few seconds in all.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from r1pipe.cli import COMMANDS, command_for, main
from r1pipe.config import recipe_names
from r1pipe.stages import BUILTIN_STAGES

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))

FENCE = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"\b((?:bench|cluster|recipes|docs|tests)/[\w./-]*\w)")
# commands that only read and print, run as they are shown when they have no --dry-run
READ_ONLY = {("model", "info"), ("plan",)}


def code_blocks(text: str) -> list[str]:
    return [m.group(1) for m in FENCE.finditer(text)]


def code_lines(text: str, first_word: str) -> list[str]:
    """Lines of the code blocks that start with `first_word` (continuation backslashes joined)."""
    lines = []
    for block in code_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.split(" ", 1)[0] == first_word:
                lines.append(line)
    return lines


def readme_commands() -> list[str]:
    return code_lines(README.read_text(), "r1pipe")


def has_dry_run(parser) -> bool:
    return any("--dry-run" in action.option_strings for action in parser._actions)


def test_readme_shows_the_main_commands():
    commands = readme_commands()
    assert "r1pipe run r1-zero" in commands
    assert len(README.read_text().splitlines()) <= 200


@pytest.mark.parametrize("line", readme_commands())
def test_every_readme_command_parses_and_passes_its_checks(line, tmp_path, monkeypatch, capsys):
    argv = shlex.split(line)[1:]
    command = command_for(argv)
    assert command is not None, f"README: {line!r} is not an r1pipe command"
    parser, _, _ = command
    monkeypatch.chdir(tmp_path)  # nothing a dry run might write lands in the repository
    if has_dry_run(parser):
        run = argv if "--dry-run" in argv else [*argv, "--dry-run"]
    else:
        assert any(tuple(argv[: len(words)]) == words for words in READ_ONLY), \
            f"README: {line!r} has no --dry-run; show it in the commands table only"
        run = argv
    rc = main(run)
    out = capsys.readouterr()
    assert rc == 0, f"README: {line!r} fails its dry run:\n{out.out[-2000:]}{out.err[-2000:]}"
    assert not any(tmp_path.iterdir()), f"README: {line!r} --dry-run wrote {sorted(p.name for p in tmp_path.iterdir())}"


def docs_commands() -> list[tuple[str, str]]:
    return [(page.name, line) for page in DOCS for line in code_lines(page.read_text(), "r1pipe")]


@pytest.mark.parametrize("page, line", docs_commands())
def test_every_docs_command_parses(page, line, tmp_path, monkeypatch, capsys):
    """The docs pages' commands parse; those with a dry run pass it (others, e.g. `sandbox check`, are
    only parsed: they do real work)."""
    argv = shlex.split(line)[1:]
    command = command_for(argv)
    assert command is not None, f"{page}: {line!r} is not an r1pipe command"
    parser, _, rest = command
    monkeypatch.chdir(tmp_path)
    if has_dry_run(parser):
        rc = main(argv if "--dry-run" in argv else [*argv, "--dry-run"])
        out = capsys.readouterr()
        assert rc == 0, f"{page}: {line!r} fails its dry run:\n{out.out[-2000:]}{out.err[-2000:]}"
    else:
        parser.parse_intermixed_args(rest)


def test_ci_runs_the_readme_set_up_and_test_commands():
    text = README.read_text()
    ci_lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    tests = code_lines(text, "pytest")
    assert tests == ["pytest -q"], tests
    assert tests[0] in ci_lines
    setup = code_lines(text, "python3") + code_lines(text, "pip")
    assert len(setup) == 2, setup
    for part in (p.strip() for line in setup for p in line.split("&&")):
        assert part in ci_lines, f".ci/run lacks the README's {part!r}"


def test_every_recipe_the_readme_names_exists():
    text = README.read_text()
    shipped = set(recipe_names())
    named = {m for m in re.findall(r"r1pipe run ([\w.-]+)", text) if not m.isupper()}
    named |= set(re.findall(r"recipes/([\w.-]+)\.yaml", text))
    recipes_section = text.split("## Recipes", 1)[1].split("\n## ", 1)[0]
    headings = set(re.findall(r"^### ([\w-]+):", recipes_section, re.M))
    assert {"r1-zero", "r1", "distill", "eval"} <= headings
    named |= headings - {"eval"}  # `eval` is the command, the others recipes
    assert named, "no recipe found in the README"
    assert named <= shipped, f"README names recipes that do not ship: {sorted(named - shipped)}"


def test_every_file_the_readme_names_exists():
    text = README.read_text()
    paths = set(REPO_PATH.findall(text))
    assert any(p.startswith("bench/") for p in paths)
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"README names files that do not exist: {missing}"


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = markdown
    for block in FENCE.findall(text):
        text = text.replace(block, "")
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("page", [README, ROOT / "cluster/README.md", *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_docs_link_resolves(page):
    text = page.read_text()
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.relative_to(ROOT)}: link {target!r} points at nothing"
        if anchor and resolved.suffix == ".md":
            assert anchor in heading_anchors(resolved.read_text()), \
                f"{page.relative_to(ROOT)}: link {target!r}: no such heading in {resolved.relative_to(ROOT)}"
    if page == README:
        linked = {(page.parent / t.partition("#")[0]).resolve() for t in LINK.findall(text)}
        assert set(DOCS) <= linked, f"README links no {sorted(p.name for p in set(DOCS) - linked)}"


def test_commands_table_lists_every_cli_command():
    text = README.read_text()
    table = text.split("## Commands", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `r1pipe ([^`]+)`", table, re.M)
    shown = set()
    for row in rows:
        argv = row.split()
        command = next((words for words, _, _ in COMMANDS if tuple(argv[: len(words)]) == words), None)
        assert command is not None, f"commands table: `r1pipe {row}` is not a command"
        shown.add(command)
    assert shown == {words for words, _, _ in COMMANDS}, "commands table misses " + str(
        sorted(" ".join(w) for w in {words for words, _, _ in COMMANDS} - shown))


def layout_block() -> list[str]:
    text = README.read_text()
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    return code_blocks(section)[0].splitlines()


def listed(line_start: str) -> list[str]:
    """The comma-separated names after the label on the layout line that starts with `line_start`."""
    line = next(line for line in layout_block() if line.strip().startswith(line_start))
    names = line.split(":", 1)[1] if ":" in line else line.strip()[len(line_start):]
    return [n.strip() for n in re.sub(r"\(.*?\)|->.*", "", names).split(",") if n.strip()]


def test_layout_matches_the_tree():
    lines = layout_block()
    top = {line.split()[0].rstrip("/") for line in lines if line and not line.startswith(" ") and line.split()[0].endswith("/")}
    ignored = {line.strip().strip("/") for line in (ROOT / ".gitignore").read_text().splitlines() if line.startswith("/")}
    tree = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in ignored
            and not p.name.endswith(".egg-info") and p.name != "__pycache__"}
    assert top == tree, f"layout lists {sorted(top - tree)} that are not in the tree, misses {sorted(tree - top)}"
    sub = {line.split()[0].rstrip("/") for line in lines if line.startswith("  ") and line.split()[0].endswith("/")}
    packages = {p.name for p in (ROOT / "r1pipe").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert sub == packages, f"layout's r1pipe/ lists {sorted(sub - packages)}, misses {sorted(packages - sub)}"
    assert set(listed("stages/")) == set(BUILTIN_STAGES), listed("stages/")
    assert set(listed("recipes/")) == set(recipe_names()), listed("recipes/")

"""Synthetic reasoning problems for the embedded tiny base model.

Multi-digit addition, subtraction and multiplication by a digit, each with two kinds of
completion in the R1-Zero format:

- worked: column-by-column steps from the units up, each step writing its sum (or difference,
  or product) and the answer digits found so far, so every step only needs nearby tokens:
      " <think> 7+5=12 2 ; 4+8+1=13 32 ; 3+1=4 432 </think> <answer> 432 </answer>"
- guess: no steps, a bare guess that is right only sometimes:
      " <think> guess </think> <answer> 438 </answer>"

Corpus prompts come in two phrasings. Held-out and RL prompts ask "What is 347 + 85?", and in the
corpus such a question is worked only `worked_fraction` of the time; "Work out 347 + 85 step by
step." (a `tutor_fraction` share of the corpus) is always worked. So the corpus teaches the steps
often, yet the base rarely uses them when merely asked: it solves some but far from all problems,
and reinforcement learning with an accuracy reward has to discover that working the steps pays.
All randomness comes from an explicit random.Random.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from r1pipe.data.templates import r1_zero_prompt

KINDS = ("add", "sub", "mul")
OPERATORS = {"add": "+", "sub": "-", "mul": "*"}
GUESS_THINK = "guess"


@dataclass(frozen=True)
class Problem:
    kind: str  # one of KINDS
    a: int
    b: int

    @property
    def question(self) -> str:
        return f"What is {self.a} {OPERATORS[self.kind]} {self.b}?"

    @property
    def tutor_question(self) -> str:
        return f"Work out {self.a} {OPERATORS[self.kind]} {self.b} step by step."

    @property
    def answer(self) -> int:
        if self.kind == "add":
            return self.a + self.b
        if self.kind == "sub":
            return self.a - self.b
        return self.a * self.b


def digits_lsb(n: int) -> list[int]:
    """Decimal digits of n >= 0, units first."""
    return [int(c) for c in reversed(str(n))]


def worked_add(a: int, b: int) -> str:
    da, db = digits_lsb(a), digits_lsb(b)
    steps, partial, carry = [], "", 0
    n = max(len(da), len(db))
    for i in range(n):
        terms = [str(d[i]) for d in (da, db) if i < len(d)] + (["1"] if carry else [])
        s = sum(int(t) for t in terms)
        partial = (str(s) if i == n - 1 else str(s % 10)) + partial  # the last column keeps its carry
        carry = s // 10
        steps.append(f"{'+'.join(terms)}={s} {partial}")
    return " ; ".join(steps)


def worked_sub(a: int, b: int) -> str:
    """a - b for a >= b; a column that borrows writes its top digit with the borrowed ten (14-8=6)."""
    assert a >= b, (a, b)
    da, db = digits_lsb(a), digits_lsb(b)
    steps, partial, borrow = [], "", 0
    for i, top in enumerate(da):
        bottom = db[i] if i < len(db) else None
        take = (bottom or 0) + borrow
        needs_borrow = top < take
        top_value = top + 10 if needs_borrow else top
        terms = [str(top_value)] + ([str(bottom)] if bottom is not None else []) + (["1"] if borrow else [])
        r = top_value - take
        partial = str(r) + partial
        borrow = int(needs_borrow)
        steps.append(f"{'-'.join(terms)}={r} {partial}")
    return " ; ".join(steps)


def worked_mul(a: int, b: int) -> str:
    """a * b for a single digit b."""
    assert 0 <= b <= 9, b
    da = digits_lsb(a)
    steps, partial, carry = [], "", 0
    for i, d in enumerate(da):
        v = d * b + carry
        term = f"{d}*{b}" + (f"+{carry}" if carry else "")
        partial = (str(v) if i == len(da) - 1 else str(v % 10)) + partial
        carry = v // 10
        steps.append(f"{term}={v} {partial}")
    return " ; ".join(steps)


WORKED = {"add": worked_add, "sub": worked_sub, "mul": worked_mul}


def worked_steps(p: Problem) -> str:
    return WORKED[p.kind](p.a, p.b)


def guess_answer(p: Problem, rng: random.Random, p_correct: float) -> int:
    """The right answer with probability p_correct, else a number with as many digits drawn
    uniformly (never the answer): a bare guess carries no hint of how to compute the answer."""
    answer = p.answer
    if rng.random() < p_correct:
        return answer
    digits = len(str(answer))
    low, high = (10 ** (digits - 1) if digits > 1 else 0), 10**digits - 1
    while True:
        g = rng.randint(low, high)
        if g != answer:
            return g


def completion(p: Problem, worked: bool, rng: random.Random, guess_correct: float) -> str:
    """The assistant's text after "Assistant:" in the R1-Zero format (without the eos token)."""
    if worked:
        return f" <think> {worked_steps(p)} </think> <answer> {p.answer} </answer>"
    return f" <think> {GUESS_THINK} </think> <answer> {guess_answer(p, rng, guess_correct)} </answer>"


def _number(rng: random.Random, min_digits: int, max_digits: int) -> int:
    d = rng.randint(min_digits, max_digits)
    return rng.randint(10 ** (d - 1) if d > 1 else 0, 10**d - 1)


def sample_problem(rng: random.Random, kinds: tuple[str, ...] | list[str], max_digits: int) -> Problem:
    """One problem: a kind drawn uniformly; the first operand has 2..max_digits digits, the second
    1..max_digits (a single digit 2..9 for multiplication); subtraction never goes negative."""
    kind = rng.choice(list(kinds))
    if kind not in KINDS:
        raise ValueError(f"unknown problem kind {kind!r}; known: {KINDS}")
    a = _number(rng, 2, max_digits)
    if kind == "mul":
        return Problem(kind, a, rng.randint(2, 9))
    b = _number(rng, 1, max_digits)
    if kind == "sub" and b > a:
        a, b = b, a
    if kind == "add" and rng.random() < 0.5:
        a, b = b, a
    return Problem(kind, a, b)


def problem_row(p: Problem, id_: str) -> dict:
    """The JSONL row of a problem: `prompt` is ready to feed to the model (R1-Zero template
    applied), `problem` the bare question for callers that use their own template."""
    return {"id": id_, "prompt": r1_zero_prompt(p.question), "answer": str(p.answer), "problem": p.question, "kind": p.kind}


def draw_splits(
    seed: int, kinds: tuple[str, ...] | list[str], max_digits: int, sizes: Sequence[int]
) -> list[list[Problem]]:
    """One list of distinct problems per size, disjoint from each other, drawn in order from one stream
    seeded by `seed`: a list's problems depend only on the sizes before and including its own, so a
    list added at the end leaves the earlier ones as they were."""
    rng = random.Random(seed)
    seen: set[Problem] = set()
    out: list[list[Problem]] = [[] for _ in sizes]
    for split, n in enumerate(sizes):
        tries = 0
        while len(out[split]) < n:
            tries += 1
            if tries > 100 * (n + 10):
                raise ValueError(f"cannot draw {n} distinct problems of {list(kinds)} with max_digits={max_digits}")
            p = sample_problem(rng, kinds, max_digits)
            if p not in seen:
                seen.add(p)
                out[split].append(p)
    return out


def make_splits(
    seed: int, kinds: tuple[str, ...] | list[str], max_digits: int, n_heldout: int, n_train: int
) -> tuple[list[Problem], list[Problem]]:
    """Held-out and RL-train problems: distinct questions, disjoint from each other (draw_splits)."""
    heldout, train = draw_splits(seed, kinds, max_digits, (n_heldout, n_train))
    return heldout, train


def corpus_texts(
    n: int,
    seed: int,
    kinds: tuple[str, ...] | list[str],
    max_digits: int,
    worked_fraction: float,
    guess_correct: float,
    exclude: set[Problem],
    tutor_fraction: float = 0.0,
) -> list[tuple[str, str]]:
    """n pre-training examples as (prompt, completion) pairs; problems in `exclude` (held-out and
    RL-train) never appear. A tutor_fraction share asks for the steps and is always worked; the
    rest ask "What is ...?" and are worked with probability worked_fraction."""
    rng = random.Random(seed)
    out: list[tuple[str, str]] = []
    while len(out) < n:
        p = sample_problem(rng, kinds, max_digits)
        if p in exclude:
            continue
        if rng.random() < tutor_fraction:
            out.append((r1_zero_prompt(p.tutor_question), completion(p, True, rng, guess_correct)))
            continue
        worked = rng.random() < worked_fraction
        out.append((r1_zero_prompt(p.question), completion(p, worked, rng, guess_correct)))
    return out


# ---------------------------------------------------------------- the R1 world
#
# The R1 recipe's tiny world adds, behind options whose defaults leave everything above as it is:
# - readable steps: each column step carries words ("step 7+5=12 keep 2"), so the chain of thought
#   has a language whose consistency can be measured;
# - language mixing: in a share of the worked chains the step words drift into a second script
#   ("step 7+5=12 keep 2 ; 步 4+8+1=13 留 32"), the small-scale echo of R1-Zero's mixed-language chains;
# - a summary closing the chain of thought ("so 347 + 85 = 432"), the R1 output format of the
#   cold-start set (reasoning, a short summary, then the answer);
# - a code domain: "write a Python function" tasks whose constant must be worked out, graded by
#   running tests (`test_list`, MBPP style) in the sandbox through the code reward.

STEP_WORDS: dict[str, tuple[str, str]] = {"en": ("step", "keep"), "zh": ("步", "留")}
SECOND_LANGUAGE = "zh"
DOMAINS = ("math", "code")


def readable_steps(p: Problem, rng: random.Random | None = None, mix: float = 0.0) -> str:
    """worked_steps with words around each step: "step 7+5=12 keep 2 ; step 4+8+1=13 keep 32".
    With mix > 0 the chain drifts: from the second step on, each step switches to the second
    language with that probability (rng draws) and the rest of the chain stays switched
    ("step 7+5=12 keep 2 ; 步 4+8+1=13 留 32 ; 步 3+1=4 留 432")."""
    out = []
    lang = "en"
    for i, step in enumerate(worked_steps(p).split(" ; ")):
        expr, partial = step.rsplit(" ", 1)
        if i > 0 and lang == "en" and mix > 0 and rng is not None and rng.random() < mix:
            lang = SECOND_LANGUAGE
        head, keep = STEP_WORDS[lang]
        out.append(f"{head} {expr} {keep} {partial}")
    return " ; ".join(out)


def summary(p: Problem, code: bool = False) -> str:
    """The short summary that closes an R1-format chain of thought; for a code task it also says what the
    function returns, so the program that follows is cued by the words right before it (a tiny model
    reads the question's "Write a Python function" poorly from the far end of a chain)."""
    text = f"so {p.a} {OPERATORS[p.kind]} {p.b} = {p.answer}"
    return f"{text} and f(x) = x + {p.answer}" if code else text


@dataclass(frozen=True)
class CodeTask:
    """"Write a Python function f(x) that returns x plus <a op b>.": the constant a op b has to be
    worked out (the tests check f at several points, so only the right constant passes)."""

    problem: Problem

    @property
    def question(self) -> str:
        p = self.problem
        return f"Write a Python function f(x) that returns x plus {p.a} {OPERATORS[p.kind]} {p.b}."

    @property
    def tutor_question(self) -> str:
        return self.question[:-1] + ", working the constant out step by step."

    def program(self, constant: int) -> str:
        return f"def f(x): return x + {constant}"

    @property
    def test_list(self) -> list[str]:
        c = self.problem.answer
        return [f"assert f({x}) == {x + c}" for x in (0, 3, -7)]


def r1_completion(p: Problem, *, worked: bool, rng: random.Random, guess_correct: float, code: bool = False,
                  mix: float = 0.0, with_summary: bool = False) -> str:
    """A completion in the R1 world: readable (possibly mixed) steps or a bare guess; the answer is
    the number, or for a code task the program with that constant."""
    if worked:
        think = readable_steps(p, rng, mix) + (f" ; {summary(p, code)}" if with_summary else "")
        value = p.answer
    else:
        think, value = GUESS_THINK, guess_answer(p, rng, guess_correct)
    answer = CodeTask(p).program(value) if code else str(value)
    return f" <think> {think} </think> <answer> {answer} </answer>"


def math_row(p: Problem, id_: str) -> dict:
    return {**problem_row(p, id_), "domain": "math"}


def code_row(task: CodeTask, id_: str) -> dict:
    """A code-domain row: the prompt (R1-Zero template applied) and MBPP-style tests."""
    return {"id": id_, "prompt": r1_zero_prompt(task.question), "problem": task.question,
            "test_list": task.test_list, "domain": "code", "kind": task.problem.kind}


def r1_corpus_texts(n: int, seed: int, kinds: tuple[str, ...] | list[str], max_digits: int, *, worked_fraction: float,
                    guess_correct: float, exclude: set[Problem], tutor_fraction: float, mix_fraction: float,
                    mix_prob: float, code_fraction: float) -> list[tuple[str, str]]:
    """The R1 world's pre-training corpus (see corpus_texts for the tutor / worked / guess split):
    readable steps, a mix_fraction share of the worked chains drifting into the second script
    (readable_steps with mix_prob), and a code_fraction share of code tasks. With most chains
    drifting, the reasoning R1-Zero-style RL amplifies is the mixed kind; only the cold start
    (English, with a summary) and the language-consistency reward make it readable."""
    rng = random.Random(seed)
    out: list[tuple[str, str]] = []
    while len(out) < n:
        p = sample_problem(rng, kinds, max_digits)
        if p in exclude:
            continue
        code = rng.random() < code_fraction
        task = CodeTask(p)
        tutor = rng.random() < tutor_fraction
        worked = tutor or rng.random() < worked_fraction
        mix = mix_prob if worked and rng.random() < mix_fraction else 0.0
        if code:
            question = task.tutor_question if tutor else task.question
        else:
            question = p.tutor_question if tutor else p.question
        out.append((r1_zero_prompt(question),
                    r1_completion(p, worked=worked, rng=rng, guess_correct=guess_correct, code=code, mix=mix)))
    return out


def cold_start_rows(n: int, seed: int, kinds: tuple[str, ...] | list[str], max_digits: int, exclude: set[Problem],
                    code_fraction: float) -> list[tuple[Problem, dict]]:
    """The cold-start set: n readable worked solutions in the R1 output format (English steps, a
    summary, then the answer), as (problem, {"id", "prompt" (the bare question), "response", "domain"})."""
    rng = random.Random(seed)
    out: list[tuple[Problem, dict]] = []
    seen: set[tuple[bool, Problem]] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 100 * (n + 10):
            raise ValueError(f"cannot draw {n} distinct cold-start problems of {list(kinds)} with max_digits={max_digits}")
        p = sample_problem(rng, kinds, max_digits)
        code = rng.random() < code_fraction
        if p in exclude or (code, p) in seen:
            continue
        seen.add((code, p))
        question = CodeTask(p).question if code else p.question
        response = r1_completion(p, worked=True, rng=rng, guess_correct=0.0, code=code, with_summary=True)
        out.append((p, {"id": f"cold-{len(out)}", "prompt": question, "response": response.strip(),
                         "domain": "code" if code else "math"}))
    return out

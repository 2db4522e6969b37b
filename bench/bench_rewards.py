"""Benchmark the rewards: math verifications/s (cache cold and warm) and sandboxed HumanEval runs/s.

Math: every MATH-500 gold against a seeded rewrite of it (an equivalent form, or a wrong one),
split over 2 worker processes, timed once with cold caches and once more warm (the same pairs
again: every verdict from the cache); the peer is math-verify's own parse+verify on a sample of
the same pairs in one process. Code: all 164 HumanEval canonical solutions in the
sandbox on a thread pool; the peer is the same programs run as bare subprocesses (no isolation).

    python bench/bench_rewards.py [--workers 2] [--peer-sample 150] [--threads 4]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

from tqdm import tqdm

DATA = Path(__file__).resolve().parents[1] / "r1pipe" / "eval" / "suites_data"  # shipped copies


def rewrite(gold: str, rng: random.Random) -> str:
    """An equivalent surface form of gold (or, one time in four, a wrong answer)."""
    if re.fullmatch(r"-?\d+", gold):
        n = int(gold)
        if rng.random() < 0.25:
            return str(n + rng.choice([-1, 1]))
        return rng.choice([f"{n}.0", f"\\frac{{{2 * n}}}{{2}}", f"x = {n}", f"{n:,}", f"\\boxed{{{n}}}", f"{n}\\text{{ units}}",
                           f"{n:,}".replace(",", ",\\!"), f"The answer is ${n}$.", f"So we get\n#### {n}"])
    m = re.fullmatch(r"(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}", gold)
    if m:
        f = Fraction(int(m[2]), int(m[3])) * (-1 if m[1] else 1)
        if rng.random() < 0.25:
            return f"{m[1]}\\frac{{{m[3]}}}{{{m[2]}}}"
        forms = [f"{f.numerator}/{f.denominator}", f"\\dfrac{{{f.numerator}}}{{{f.denominator}}}"]
        if 10 ** 6 % f.denominator == 0:
            forms.append(str(float(f)))
        return rng.choice(forms)
    if rng.random() < 0.25 and re.search(r"\d", gold):  # a realistic wrong answer: one digit off
        return re.sub(r"\d", lambda d: str((int(d.group()) + 1) % 10), gold, count=1)
    return rng.choice([gold.replace(" ", ""), re.sub(r"([,+=])", r" \1 ", gold), gold.replace("\\frac", "\\dfrac"), f"${gold}$",
                       f"Hence the answer is ${gold}$.", f"We find $\\boxed{{{gold}}}$."])


def _verify_chunk(pairs: list[tuple[str, str]]) -> tuple[int, float, float, int]:
    """(number judged equal, cold seconds, warm seconds, number that reached math-verify)."""
    from r1pipe.rewards.grader import clear_cache, verify_math
    from r1pipe.rewards.verifier import default_pool

    default_pool().warm_up()  # start-up is not verification time
    clear_cache()
    start = time.perf_counter()
    verdicts = [verify_math(p, g) for p, g in pairs]
    cold = time.perf_counter() - start
    start = time.perf_counter()
    for p, g in pairs:
        verify_math(p, g)
    warm = time.perf_counter() - start
    return sum(v.equal for v in verdicts), cold, warm, sum(v.method == "math_verify" for v in verdicts)


def _math_verify_peer(pairs: list[tuple[str, str]]) -> float:
    from math_verify import parse, verify

    start = time.perf_counter()
    for p, g in tqdm(pairs, desc="math-verify peer", leave=False):
        verify(parse(f"${g}$"), parse(f"${p}$"))
    return time.perf_counter() - start


def bench_math(workers: int, peer_sample: int) -> None:
    rows = [json.loads(line) for line in (DATA / "math500" / "test.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    pairs = [(rewrite(r["answer"], rng), r["answer"]) for r in rows]
    chunks = [pairs[i::workers] for i in range(workers)]
    with ProcessPoolExecutor(workers) as ex:
        results = list(ex.map(_verify_chunk, chunks))
    ours = len(pairs) / max(r[1] for r in results)
    warm = len(pairs) / max(r[2] for r in results)
    equal = sum(r[0] for r in results)
    slow = sum(r[3] for r in results)
    sample = random.Random(1).sample(pairs, min(peer_sample, len(pairs)))
    peer = len(sample) / _math_verify_peer(sample)
    print(f"math: {len(pairs)} MATH-500 pairs ({equal} judged equal, {slow} decided by math-verify), "
          f"{workers} processes: cold cache {ours:.0f} verifications/s, warm cache {warm:.0f}/s; "
          f"math-verify alone (1 process): {peer:.0f}/s; cold ratio {ours / peer:.1f}x "
          f"({ours / workers / peer:.1f}x per process)")
    print(json.dumps({"math_cold_per_s": round(ours, 1), "math_warm_per_s": round(warm, 1),
                      "math_verify_peer_per_s": round(peer, 1), "cold_ratio": round(ours / peer, 2),
                      "pairs": len(pairs), "judged_equal": equal, "via_math_verify": slow}))


def bench_code(threads: int) -> None:
    from r1pipe.rewards.code import check_humaneval, humaneval_program
    from r1pipe.rewards.sandbox import active_isolation

    with gzip.open(DATA / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        problems = [json.loads(line) for line in f]
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        passed = sum(r.passed for r in tqdm(ex.map(lambda p: check_humaneval(p, p["canonical_solution"], 30), problems),
                                           total=len(problems), desc="sandboxed", leave=False))
    sandboxed = len(problems) / (time.perf_counter() - start)

    def bare(p: dict) -> bool:
        with tempfile.NamedTemporaryFile("w", suffix=".py") as f:
            f.write(humaneval_program(p, p["canonical_solution"]))
            f.flush()
            return subprocess.run([sys.executable, f.name], capture_output=True, timeout=30).returncode == 0

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        bare_passed = sum(tqdm(ex.map(bare, problems), total=len(problems), desc="bare", leave=False))
    unsandboxed = len(problems) / (time.perf_counter() - start)
    print(f"code: HumanEval canonical {passed}/{len(problems)} passed in the sandbox "
          f"({active_isolation().mode}), {threads} threads: {sandboxed:.1f} runs/s; bare subprocess "
          f"({bare_passed} passed): {unsandboxed:.1f} runs/s; ratio {sandboxed / unsandboxed:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--peer-sample", type=int, default=150)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--only", choices=["math", "code"])
    args = parser.parse_args()
    if args.only in (None, "math"):
        bench_math(args.workers, args.peer_sample)
    if args.only in (None, "code"):
        bench_code(args.threads)


if __name__ == "__main__":
    main()

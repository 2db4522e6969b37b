"""The math-verify side of the grader, run as a child process that the parent can kill on a deadline.

Protocol: one JSON object per line on stdin, {"pred": str, "gold": str}; one per line on stdout,
{"equal": bool, "error": str | null}: math-verify's default `verify(parse(gold), parse(pred))` (the
caller wraps a bare answer in `$...$`: math-verify reads bare LaTeX poorly). Started by
`r1pipe.rewards.verifier.VerifierPool`.
"""

from __future__ import annotations

import json
import sys


def _verify(pred: str, gold: str) -> bool:
    from math_verify import parse, verify

    gold_parsed = parse(gold, parsing_timeout=None)
    pred_parsed = parse(pred, parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def main() -> None:
    # ready means warm: math-verify builds its LaTeX and expression parsers on the first calls (~0.1-0.2 s)
    _verify("$\\frac{1}{2}$", "$0.5$")
    _verify("x + 1", "2")

    out = sys.stdout
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        try:
            req = json.loads(line)
            reply = {"equal": _verify(req["pred"], req["gold"]), "error": None}
        except Exception as exc:  # a parser crash is a "not equal" with its reason, never a dead server
            reply = {"equal": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()

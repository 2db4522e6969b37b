"""Evaluation on math and code suites, the R1 paper's way (`r1pipe eval`).

Python API (what the recipe's eval stage calls)::

    from r1pipe.eval import evaluate
    report = evaluate(
        model,                 # checkpoint dir (str | Path); None when scoring saved `responses`
        suites,                # "gsm8k,math500" | ["aime24", Suite, ...]; groups "math", "code", "all"
        out_dir,               # report.json, report.md, generations.jsonl are written here
        *, responses=None,     # JSONL of {"id", "response"[, "suite"]}: score instead of generating
        k=1, greedy=False, temperature=0.6, top_p=0.95, max_tokens=4096,
        template="auto",       # auto | r1-zero | r1 | raw
        backend="engine",      # engine (r1pipe's own) | vllm
        workers=1,             # generation workers (Ray actors of a GenerationGroup)
        device=None, dtype=torch.float32, seed=0, limit=None,
        pass_at=(), grade_threads=None, timeout_s=10.0, extract_mode="auto",
        backend_options=None,  # extra keyword arguments for the engine (e.g. max_num_seqs)
        cluster=None,          # a recipe's cluster section: where Ray runs when it is not running yet
        show=True,
    ) -> dict

Generation goes through r1pipe.workers.generation.GenerationGroup and grading through the rewards on a
RewardPool (r1pipe.eval.scoring), as in the training stages.

The returned dict is report.json: {"suites": {name: {"n_problems", "k", "pass@1", "cons@k" (math),
"pass@k", "pass@j"..., "n_samples", "skipped_rows", "missing", "unknown_ids", "grader_errors",
"generate_s", "grade_s", "notes"}}, "mode", and the generation settings}. Metrics are fractions in [0, 1].

A user suite: `load_suite_file(path, kind="math", prompt_field="prompt", answer_field="answer",
id_field="id")`, e.g. the synthetic held-out file of the pretrain stage ({"id", "prompt", "answer"}).
"""
from r1pipe.eval.metrics import cons_at_k, majority_vote, mean_pass_at_1, mean_pass_at_k, pass_at_k
from r1pipe.eval.runner import evaluate
from r1pipe.eval.suites import REGISTRY, Problem, Suite, load_suite, load_suite_file, resolve_suites

__all__ = [
    "evaluate", "Suite", "Problem", "REGISTRY", "load_suite", "load_suite_file", "resolve_suites",
    "pass_at_k", "mean_pass_at_k", "mean_pass_at_1", "majority_vote", "cons_at_k",
]

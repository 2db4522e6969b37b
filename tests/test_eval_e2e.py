"""End to end: a tiny random r1pipe model through a generation group on GSM8K problems and on a
synthetic held-out --suite-file, via `r1pipe eval` (which starts Ray for itself, quietly, and stops it);
saved generations re-score to the same numbers; one worker or two give the same samples; a tokenizer's
chat template renders the prompts; a dense Hugging Face model (random Llama) goes through the same group
and generates what transformers' greedy generate does."""
import json

import pytest
import ray
import torch

from r1pipe.cli import main as r1pipe_main
from r1pipe.data.synthetic import make_splits, problem_row
from r1pipe.data.tokenizer import save_tokenizer, train_tokenizer
from r1pipe.eval import evaluate, load_suite

pytest.importorskip("r1pipe.engine")
pytest.importorskip("r1pipe.rewards.extract")


@pytest.fixture(scope="module")
def tokenizer_corpus():
    gsm8k = [p.question for p in load_suite("gsm8k").problems[:200]]
    heldout, _ = make_splits(seed=0, kinds=("add", "sub"), max_digits=3, n_heldout=4, n_train=0)
    return gsm8k + [problem_row(p, str(i))["prompt"] + " <think> 1+2=3 </think> <answer> 3 </answer>" for i, p in enumerate(heldout)]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tokenizer_corpus):
    from r1pipe.model import ModelConfig, Transformer, save_pretrained

    path = tmp_path_factory.mktemp("tiny_ckpt")
    config = ModelConfig.preset("tiny")
    tok = train_tokenizer(tokenizer_corpus, vocab_size=config.vocab_size)
    save_tokenizer(tok, path)
    save_pretrained(Transformer(config, seed=0), path)
    return path


@pytest.fixture(scope="module")
def heldout_file(tmp_path_factory):
    heldout, _ = make_splits(seed=1, kinds=("add", "sub"), max_digits=2, n_heldout=3, n_train=0)
    path = tmp_path_factory.mktemp("suite") / "heldout.jsonl"
    path.write_text("".join(json.dumps(problem_row(p, f"h{i}")) + "\n" for i, p in enumerate(heldout)))
    return path


ENGINE = ["--max-num-seqs", "8", "--max-model-len", "512", "--quiet"]


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_engine_eval_on_gsm8k_and_user_suite_writes_every_output(tiny_checkpoint, heldout_file, tmp_path, capfd):
    assert not ray.is_initialized()
    out = tmp_path / "out"
    rc = r1pipe_main(["eval", "--model", str(tiny_checkpoint), "--suite", "gsm8k", "--suite-file", str(heldout_file),
                      "--limit", "3", "-k", "2", "--max-tokens", "8", "--seed", "3", "--out", str(out), *ENGINE])
    assert rc == 0 and not ray.is_initialized()  # the Ray it started for itself is shut down
    printed = capfd.readouterr()
    # quiet: no Ray start-up lines, only eval's own (the suite file's detected fields, where the reports are)
    assert [line.split(":")[0] for line in printed.err.splitlines()] == ["r1pipe eval"], printed.err
    assert printed.out.startswith("reports: ") and len(printed.out.splitlines()) == 1, printed.out
    report = json.loads((out / "report.json").read_text())
    assert report["backend"] == "engine" and report["template"] == "r1-zero" and report["k"] == 2
    assert report["workers"] == 1
    for name in ("gsm8k", "heldout"):
        entry = report["suites"][name]
        assert entry["n_problems"] == 3 and entry["k"] == 2 and entry["n_samples"] == 6
        assert 0.0 <= entry["pass@1"] <= entry["pass@k"] <= 1.0 and "cons@k" in entry
        assert entry["grader_errors"] == 0
    md = (out / "report.md").read_text()
    assert "| gsm8k | 3 | 2 |" in md and "| heldout | 3 | 2 |" in md
    rows = read_rows(out / "generations.jsonl")
    assert [(r["suite"], r["id"], r["sample"]) for r in rows[:2]] == [("gsm8k", "0", 0), ("gsm8k", "0", 1)]
    assert {r["id"] for r in rows if r["suite"] == "heldout"} == {"h0", "h1", "h2"}
    gsm_prompt = rows[0]["prompt"]
    assert gsm_prompt.startswith("A conversation between User and Assistant") and "Janet" in gsm_prompt
    held_prompt = next(r["prompt"] for r in rows if r["suite"] == "heldout")
    assert held_prompt.count("A conversation between User") == 1  # its prompt is templated already
    assert all(isinstance(r["response"], str) and r["score"] in (0.0, 1.0) and "gold" in r for r in rows)

    # The saved samples re-score without a model to the same numbers.
    again = tmp_path / "again"
    rc = r1pipe_main(["eval", "--suite", "gsm8k", "--responses", str(out / "generations.jsonl"), "--limit", "3",
                      "--out", str(again), "--quiet"])
    assert rc == 0
    rescored = json.loads((again / "report.json").read_text())["suites"]["gsm8k"]
    for key in ("n_problems", "k", "pass@1", "cons@k", "pass@k"):
        assert rescored[key] == report["suites"]["gsm8k"][key]


def test_engine_sampling_is_seeded_and_greedy_is_repeatable(ray_cluster, tiny_checkpoint, tmp_path):
    def run(tag, *extra):
        evaluate(tiny_checkpoint, "gsm8k", tmp_path / tag, limit=3, max_tokens=6, show=False,
                 backend_options={"max_num_seqs": 8, "max_model_len": 512}, **dict(extra))
        return [r["response"] for r in read_rows(tmp_path / tag / "generations.jsonl")]

    a = run("a", ("k", 2), ("seed", 5))
    assert len(a) == 6 and len(set(a)) > 1
    # every problem samples with its own seed: two workers (each with part of the problems) draw the same
    assert a == run("b", ("k", 2), ("seed", 5), ("workers", 2))
    assert run("g1", ("greedy", True)) == run("g2", ("greedy", True))
    assert ray.is_initialized()  # a Ray that was running before is left running
    with pytest.raises(ValueError, match="greedy"):
        evaluate(tiny_checkpoint, "gsm8k", tmp_path / "bad", greedy=True, k=4, show=False)


def chat_tokenizer(corpus, vocab_size):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(corpus, vocab_size=vocab_size),
                                  eos_token="<|eos|>", pad_token="<|pad|>", bos_token="<|bos|>")
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
    return tok


def test_chat_template_renders_the_prompts(tmp_path, tokenizer_corpus):
    from r1pipe.model import ModelConfig, Transformer, save_pretrained

    path = tmp_path / "chat"
    tok = chat_tokenizer(tokenizer_corpus, 512)
    tok.save_pretrained(path)
    config = ModelConfig.preset("tiny")
    config.vocab_size, config.eos_token_id, config.pad_token_id = len(tok), tok.eos_token_id, tok.pad_token_id
    save_pretrained(Transformer(config, seed=0), path)
    out = tmp_path / "out"
    rc = r1pipe_main(["eval", "--model", str(path), "--suite", "amc23", "--limit", "2", "-k", "2", "--max-tokens", "6",
                      "--out", str(out), *ENGINE])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["backend"] == "engine" and report["template"] == "r1"
    assert report["suites"]["amc23"]["n_samples"] == 4
    rows = read_rows(out / "generations.jsonl")
    assert rows[0]["prompt"].startswith("<|user|>") and rows[0]["prompt"].endswith("<|assistant|>")
    assert "\\boxed{}" in rows[0]["prompt"]


def test_a_dense_model_goes_through_the_same_group_as_transformers_generates(tmp_path, tokenizer_corpus):
    """A random Llama checkpoint: `r1pipe eval` greedy through the generation group (r1pipe's engine) gives
    transformers' greedy generate's continuation of each rendered prompt."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path / "llama"
    tok = chat_tokenizer(tokenizer_corpus, 512)
    tok.save_pretrained(path)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=1024, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    out = tmp_path / "out"
    rc = r1pipe_main(["eval", "--model", str(path), "--suite", "amc23", "--limit", "2", "--greedy", "--max-tokens", "6",
                      "--out", str(out), *ENGINE])
    assert rc == 0
    rows = read_rows(out / "generations.jsonl")
    assert len(rows) == 2 and json.loads((out / "report.json").read_text())["template"] == "r1"
    for row in rows:
        ids = tok(row["prompt"], return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            generated = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        assert row["response"] == tok.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)


def test_cli_reports_bad_input_clearly(tmp_path, capsys):
    assert r1pipe_main(["eval", "--suite", "gsm8k"]) == 2
    assert r1pipe_main(["eval", "--suite", "nope", "--responses", str(tmp_path / "r.jsonl")]) == 2
    assert "nope" in capsys.readouterr().err
    assert r1pipe_main(["eval", "--suite", "gsm8k", "--responses", str(tmp_path / "absent.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "absent.jsonl" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_a_prompt_too_long_for_the_engine_is_one_line(ray_cluster, tiny_checkpoint, tmp_path, capsys):
    """The engine refuses it inside a generation worker; the command says so in one line, as for any bad input."""
    rc = r1pipe_main(["eval", "--model", str(tiny_checkpoint), "--suite", "gsm8k", "--limit", "1", "--max-tokens", "500",
                      "--max-model-len", "512", "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "exceeds max_model_len 512" in err, err


def test_cli_dry_run_checks_the_arguments_and_runs_nothing(tmp_path, capsys, monkeypatch):
    """`r1pipe eval --dry-run`: the checks a real run makes before loading anything (one of --model /
    --responses, suite names, k with --greedy, the output directory), then the plan; nothing is written."""
    monkeypatch.chdir(tmp_path)
    ok = ["eval", "--model", "ckpt", "--suite", "math500,humaneval", "-k", "4", "--pass-at", "1,2", "--limit", "10", "--dry-run"]
    assert r1pipe_main(ok) == 0
    out = capsys.readouterr().out
    assert "math500 (math, 10 problems); humaneval (humaneval, 10 problems)" in out
    assert "4 samples at temperature 0.6" in out and "pass@2" in out and "ckpt (not found here)" in out
    assert not any(tmp_path.iterdir())
    for bad, named in ([["eval", "--model", "ckpt", "--suite", "gsm9k", "--dry-run"], "gsm9k"],
                       [["eval", "--model", "ckpt", "--suite", "gsm8k", "-k", "4", "--greedy", "--dry-run"], "greedy"],
                       [["eval", "--suite", "gsm8k", "--dry-run"], "--model"],
                       [["eval", "--model", "ckpt", "--suite", "gsm8k", "--max-tokens", "0", "--dry-run"], "max_tokens"]):
        assert r1pipe_main(bad) == 2, bad
        err = capsys.readouterr().err
        assert named in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "taken").write_text("")
    assert r1pipe_main(["eval", "--model", "ckpt", "--suite", "gsm8k", "--out", "taken", "--dry-run"]) == 2
    assert "taken" in capsys.readouterr().err

"""HellaSwag: model/scoring.py, data/hellaswag.py, eval/hellaswag_score.py and python -m eval.hellaswag.

The fixture tests/fixtures/hellaswag_mini.jsonl is 12 examples written for these tests in the exact
rowanz/hellaswag schema (ActivityNet-style and WikiHow-style with bracketed artifacts).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from _eval_fixtures import REPO, tiny_random
from conftest import require_extra

from data.errors import DataError
from data.hellaswag import check_example, load_examples, read_jsonl, render
from data.tokenizer import get_tokenizer
from eval import hellaswag
from eval.cli import run
from eval.hellaswag_score import hellaswag_eval
from model.io import load_model, load_state, save_artifact

FIXTURE = REPO / "tests" / "fixtures" / "hellaswag_mini.jsonl"


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = run(hellaswag.main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc: int, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2 and "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, err)


def retokenize(art, spec: str):
    cfg, sd, meta = load_state(art)
    save_artifact(art, sd, cfg, {**meta, "tokenizer": spec}, overwrite=True)
    return art


@pytest.fixture(scope="module")
def gpt2_bpe(tmp_path_factory):
    """A small GPT-2-family model with GPT-2's own tokenizer (the BPE the llm.c reference uses)."""
    art = tiny_random(tmp_path_factory.mktemp("hs") / "gpt2", vocab_size=50257, block_size=128, n_embd=32)
    return retokenize(art, "gpt2")


def llmc_reference(hf_model, enc, doc):
    """llm.c's dev/data/hellaswag.py, written again here on transformers' GPT2LMHeadModel: the rows
    ctx + " " + ending padded with zeros, the loss masked to the ending, summed and averaged."""
    ctx = enc.encode(doc["ctx"])
    rows = [ctx + enc.encode(" " + e) for e in doc["endings"]]
    T = max(map(len, rows))
    tokens, mask = torch.zeros(4, T, dtype=torch.long), torch.zeros(4, T)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
        mask[i, len(ctx) : len(r)] = 1
    with torch.no_grad():
        logits = hf_model(tokens).logits
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none").view(4, -1)
    total = (losses * mask[:, 1:]).sum(1)
    return total, total / mask[:, 1:].sum(1)


def test_llmc_losses_equal_transformers_gpt2(gpt2_bpe):
    transformers = require_extra("transformers", "hf")
    from model.hf import config_to_hf, to_hf_state_dict

    cfg, sd, _ = load_state(gpt2_bpe)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config_to_hf(cfg))).eval()
    hf.load_state_dict(to_hf_state_dict(sd, cfg), strict=False)  # the tied head follows wte
    model, _ = load_model(gpt2_bpe)
    enc = get_tokenizer("gpt2")
    examples = read_jsonl(FIXTURE)
    records = []
    counts = hellaswag_eval(model, enc, examples, style="llmc", batch_size=5, records=records)
    assert counts.n == len(examples) == len(records) == 12 and counts.truncated == 0
    correct = correct_norm = 0
    for doc, rec in zip(examples, records, strict=True):
        total, mean = llmc_reference(hf, enc, doc)
        torch.testing.assert_close(torch.tensor(rec["loss"], dtype=torch.float32), total, atol=1e-4, rtol=0)
        assert rec["pred"] == int(total.argmin()) and rec["pred_norm"] == int(mean.argmin())
        correct += rec["pred"] == doc["label"]
        correct_norm += rec["pred_norm"] == doc["label"]
    assert (counts.correct, counts.correct_norm) == (correct, correct_norm)


def test_harness_style_equals_lm_evals_hellaswag_task(tmp_path, capsys):
    """--style harness scores what lm-eval's own hellaswag task (its process_docs) asks our model class."""
    lm_eval = require_extra("lm_eval", "eval")
    from lm_eval.tasks import TaskManager

    import eval.harness  # noqa: F401  registers the model class "gptrain"

    art = retokenize(tiny_random(tmp_path / "art", block_size=256), "bytes")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text("from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401\n")
    (tasks / "hs.yaml").write_text(
        f"task: hs_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: {FIXTURE}\n"
        "validation_split: validation\noutput_type: multiple_choice\nprocess_docs: !function utils.process_docs\n"
        'doc_to_text: "{{query}}"\ndoc_to_target: "{{label}}"\ndoc_to_choice: "choices"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    res = lm_eval.simple_evaluate(
        model="gptrain",
        model_args=f"ckpt={art}",
        tasks=["hs_local"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        bootstrap_iters=0,
        log_samples=True,
    )
    ref = res["results"]["hs_local"]
    rc, out, _ = cli(capsys, "--ckpt", art, "--data", FIXTURE, "--style", "harness", "--json", "--out", tmp_path / "p")
    ours = json.loads(out)
    assert rc == 0 and ours["examples"] == 12
    assert ours["acc"] == pytest.approx(ref["acc,none"], abs=1e-9)
    assert ours["acc_norm"] == pytest.approx(ref["acc_norm,none"], abs=1e-9)
    # the same requests: each ending's log-likelihood is minus our summed loss
    samples = sorted(res["samples"]["hs_local"], key=lambda s: s["doc_id"])
    records = [json.loads(line) for line in (tmp_path / "p").read_text().splitlines()]
    for sample, rec in zip(samples, records, strict=True):
        lls = [float(r[0][0]) for r in sample["resps"]]
        assert lls == pytest.approx([-x for x in rec["loss"]], abs=1e-4)
    llmc = json.loads(cli(capsys, "--ckpt", art, "--data", FIXTURE, "--json")[1])
    assert (llmc["acc"], llmc["acc_norm"]) != (ours["acc"], ours["acc_norm"])  # the styles do differ here


def test_harness_rendering():
    doc = check_example(
        {
            "activity_label": "Home",
            "ctx_a": "[header] How to x [title] Do y. [step] Then z",
            "ctx_b": "and more",
            "ctx": "unused",
            "endings": ["a [substeps] b", "c", "d", "e"],
            "label": "2",
        },
        "here",
    )
    assert doc["label"] == 2  # the Hugging Face copy's string labels become ints
    enc = get_tokenizer("bytes")
    r = render(doc, enc.encode_ordinary, "harness")
    assert enc.decode(r.context) == "Home: How to x. Do y. Then z And more"
    assert enc.decode(r.endings[0]) == " a b" and r.norm == [3.0, 1.0, 1.0, 1.0]
    llmc = render(doc, enc.encode_ordinary, "llmc")
    assert enc.decode(llmc.context) == "unused" and enc.decode(llmc.endings[0]) == " a [substeps] b"


@pytest.mark.parametrize("family", ["gpt2", "modern"])
def test_bytes_tokenizer_and_both_families(tmp_path, capsys, family):
    """The endings are tokenized with the model's own tokenizer; the batched, padded scores are the scores
    of each row alone."""
    art = tiny_random(tmp_path / "art", family=family, block_size=256)
    out = tmp_path / "preds.jsonl"
    rc, printed, _ = cli(capsys, "--ckpt", art, "--data", FIXTURE, "--out", out, "--batch-size", 3)
    assert rc == 0 and printed.startswith("hellaswag (llmc style) on 12 examples: acc ")
    records = [json.loads(line) for line in out.read_text().splitlines()]
    examples = read_jsonl(FIXTURE)
    model, _ = load_model(art)
    enc = get_tokenizer("bytes")
    for doc, rec in zip(examples[:3], records[:3], strict=True):
        ctx = enc.encode_ordinary(doc["ctx"])
        for e, loss, n in zip(doc["endings"], rec["loss"], rec["tokens"], strict=True):
            end = enc.encode_ordinary(" " + e)
            assert n == len(end) == len((" " + e).encode())
            row = torch.tensor([ctx + end])
            with torch.no_grad():
                alone = F.cross_entropy(model(row[:, :-1])[0, len(ctx) - 1 :], row[0, len(ctx) :], reduction="sum")
            assert loss == pytest.approx(float(alone), abs=1e-4)


def test_scoring_draws_no_random_numbers_and_keeps_train_mode(tmp_path):
    art = tiny_random(tmp_path / "art", dropout=0.5, block_size=256)
    model, _ = load_model(art)
    enc = get_tokenizer("bytes")
    examples = read_jsonl(FIXTURE, limit=4)
    ref = []
    hellaswag_eval(model, enc, examples, records=ref)
    model.train()
    state = torch.get_rng_state()
    got = []
    hellaswag_eval(model, enc, examples, records=got)
    assert model.training and torch.equal(torch.get_rng_state(), state)
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]  # no dropout while scoring


def test_every_rank_runs_the_same_number_of_forward_passes(tmp_path):
    """A sharded model's forward is a collective: a rank with fewer examples still calls it as often."""
    model, _ = load_model(tiny_random(tmp_path / "art", block_size=256))
    examples = read_jsonl(FIXTURE, limit=5)
    calls = {}
    for rank in (0, 1):
        seen = []

        def counting(idx, seen=seen):
            seen.append(idx.shape[0])
            return model(idx)

        counts = hellaswag_eval(counting, get_tokenizer("bytes"), examples, batch_size=2, rank=rank, world_size=2,
                                block_size=256)  # fmt: skip
        calls[rank] = (len(seen), counts.n)
    assert calls == {0: (2, 3), 1: (2, 2)}


def test_static_shape_gives_one_input_shape_and_the_same_scores(tmp_path):
    """For a compiled model in training: every forward sees (4 * batch_size, block_size)."""
    model, _ = load_model(tiny_random(tmp_path / "art", block_size=256))
    examples = read_jsonl(FIXTURE, limit=5)
    shapes, plain, static = set(), [], []

    def recording(idx):
        shapes.add(tuple(idx.shape))
        return model(idx)

    hellaswag_eval(model, get_tokenizer("bytes"), examples, batch_size=2, records=plain)
    hellaswag_eval(recording, get_tokenizer("bytes"), examples, batch_size=2, block_size=256, static_shape=True,
                   records=static)  # fmt: skip
    assert shapes == {(8, 256)}
    for a, b in zip(plain, static, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4) and a["pred_norm"] == b["pred_norm"]


@pytest.mark.slow
def test_torchrun_two_ranks_sum_to_one_process(tmp_path):
    art = tiny_random(tmp_path / "art", block_size=256)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    argv = ["--ckpt", art, "--data", FIXTURE, "--limit", 11, "--batch-size", 2, "--json", "--out", tmp_path / "p.jsonl"]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         "-m", "eval.hellaswag", *map(str, argv)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr
    summed = json.loads(two.stdout.strip().splitlines()[-1])  # printed by rank 0 only
    gathered = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    model, _ = load_model(art)
    one = []
    counts = hellaswag_eval(model, get_tokenizer("bytes"), read_jsonl(FIXTURE, limit=11), records=one)
    assert summed["examples"] == counts.n == 11
    assert (summed["acc"], summed["acc_norm"], summed["truncated"]) == (counts.acc, counts.acc_norm, 0)
    assert [r["index"] for r in gathered] == list(range(11))
    for x, y in zip(one, gathered, strict=True):
        assert (x["pred"], x["pred_norm"]) == (y["pred"], y["pred_norm"])
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-4)


def test_long_context_is_truncated_from_the_left_and_counted(tmp_path, capsys):
    block = 110  # the fixture's rows are 96 to 227 bytes long
    art = tiny_random(tmp_path / "art", block_size=block)
    enc = get_tokenizer("bytes")
    examples = read_jsonl(FIXTURE)
    expected = sum(
        any(len(enc.encode_ordinary(d["ctx"] + " " + e)) > block + 1 for e in d["endings"]) for d in examples
    )
    assert 0 < expected < len(examples)
    rc, out, _ = cli(capsys, "--ckpt", art, "--data", FIXTURE, "--json")
    assert rc == 0 and json.loads(out)["truncated"] == expected
    rc, out, _ = cli(capsys, "--ckpt", art, "--data", FIXTURE)
    assert f"{expected} examples were longer than the model's context of {block} tokens" in out
    # the truncated row is scored as its last block + 1 tokens, as lm-eval's hf model does
    model, _ = load_model(art)
    doc = next(d for d in examples if len(enc.encode_ordinary(d["ctx"] + " " + d["endings"][0])) > block + 1)
    records = []
    hellaswag_eval(model, enc, [doc], records=records)
    end = enc.encode_ordinary(" " + doc["endings"][0])
    row = torch.tensor([(enc.encode_ordinary(doc["ctx"]) + end)[-(block + 1) :]])
    with torch.no_grad():
        ref = F.cross_entropy(model(row[:, :-1])[0, -len(end) :], row[0, -len(end) :], reduction="sum")
    assert records[0]["loss"][0] == pytest.approx(float(ref), abs=1e-4)


def bad_file(tmp_path, doc, lines_before: int = 1):
    good = FIXTURE.read_text().splitlines()[:lines_before]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([*good, json.dumps(doc)]) + "\n")
    return path


def test_schema_errors_name_the_field_and_the_line(tmp_path, capsys):
    art = tiny_random(tmp_path / "art")
    doc = json.loads(FIXTURE.read_text().splitlines()[0])
    del doc["endings"]
    rc, _, err = cli(capsys, "--ckpt", art, "--data", bad_file(tmp_path, doc, 2))
    one_line_error(rc, err, "bad.jsonl:3", "'endings'")
    doc = {**json.loads(FIXTURE.read_text().splitlines()[0]), "label": 4}
    rc, _, err = cli(capsys, "--ckpt", art, "--data", bad_file(tmp_path, doc))
    one_line_error(rc, err, "bad.jsonl:2", "label must be 0, 1, 2 or 3", "4")
    (tmp_path / "notjson.jsonl").write_text("{not json\n")
    rc, _, err = cli(capsys, "--ckpt", art, "--data", tmp_path / "notjson.jsonl")
    one_line_error(rc, err, "notjson.jsonl:1", "not JSON")
    doc = {**json.loads(FIXTURE.read_text().splitlines()[0]), "endings": ["only", "three", "endings"]}
    with pytest.raises(DataError, match="list of 4 strings"):
        check_example(doc, "x:1")


def test_missing_data_offline_says_where_to_get_it(tmp_path, capsys, monkeypatch):
    art = tiny_random(tmp_path / "art")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, _, err = cli(capsys, "--ckpt", art, "--data", "hf:Rowan/hellaswag")
    one_line_error(rc, err, "hellaswag_val.jsonl", "--data PATH")
    rc, _, err = cli(capsys, "--ckpt", art, "--data", tmp_path / "nope.jsonl")
    one_line_error(rc, err, "nope.jsonl does not exist", "--data PATH")
    with pytest.raises(DataError, match="limit must be >= 1"):
        load_examples(str(FIXTURE), limit=0)


def test_unloadable_tokenizer_is_one_line(tmp_path, capsys):
    art = retokenize(tiny_random(tmp_path / "art"), "missing.tiktoken")
    rc, _, err = cli(capsys, "--ckpt", art, "--data", FIXTURE)
    one_line_error(rc, err, "missing.tiktoken")

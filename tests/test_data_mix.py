"""Weighted mixtures (data/mixture.py): proportions, per-source epochs, caps, schedules, rank disjointness,
exact resume on other world sizes, the tokenizer check; and a training run on a mix (config + loop).

Token at stream position p of source i is OFFSETS[i] + p, so x[b, 0] names the source and the window.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from data.errors import DataError
from data.mixture import MixSource, MixtureLoader, parse_mix

T = 16
OFFSETS = (0, 16000, 32000)
WINDOWS = (50, 30, 20)  # per source; small so that epochs turn over within a test


def write_llmc(path, tokens):
    header = np.zeros(256, dtype="<i4")
    header[:3] = 20240520, 1, len(tokens)
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    out = []
    for i, (off, w) in enumerate(zip(OFFSETS, WINDOWS, strict=True)):
        d = root / f"src{i}"
        d.mkdir()
        write_llmc(d / "s_val_000000.bin", 48000 + 1000 * i + np.arange(8 * T + 1))
        write_llmc(d / "s_train_000001.bin", off + np.arange(w * T + 1))
        out.append(d)
    return out


def sources(dirs, weights=(0.7, 0.2, 0.1), caps=(None, None, None)):
    return [MixSource(str(d), w, f"s{i}", c) for i, (d, w, c) in enumerate(zip(dirs, weights, caps, strict=True))]


def mixture(
    dirs,
    *,
    weights=(0.7, 0.2, 0.1),
    caps=(None, None, None),
    schedule=None,
    g=24,
    micro_batch=4,
    rank=0,
    world_size=1,
    seed=0,
):
    srcs, phases = parse_mix(
        [
            {"dir": s.dir, "weight": s.weight, "name": s.name, "epochs_cap": s.epochs_cap}
            for s in sources(dirs, weights, caps)
        ],
        schedule,
    )
    return MixtureLoader(
        srcs,
        phases,
        seq_len=T,
        tokens_per_step=T * g,
        micro_batch=micro_batch,
        rank=rank,
        world_size=world_size,
        seed=seed,
    )


def decode(x: torch.Tensor) -> list[tuple[int, int]]:
    """(source, window) of each row."""
    first = x[:, 0].tolist()
    return [
        (max(i for i, off in enumerate(OFFSETS) if v >= off), (v - max(o for o in OFFSETS if v >= o)) // T)
        for v in first
    ]


def step_rows(ld) -> list[tuple[int, int]]:
    return [r for x, y in ld.next_step() for r in decode(x)]


def global_steps(dirs, n_steps, world_size, micro_batch, state=None, seed=0, g=24, **kw):
    ranks = [
        mixture(dirs, g=g, micro_batch=micro_batch, rank=r, world_size=world_size, seed=seed, **kw)
        for r in range(world_size)
    ]
    if state is not None:
        for ld in ranks:
            ld.load_state_dict(state)
    steps = [[w for ld in ranks for w in step_rows(ld)] for _ in range(n_steps)]
    states = [ld.state_dict() for ld in ranks]
    assert all(s == states[0] for s in states), "the state is global: every rank holds the same"
    return steps, states[0]


def test_windows_are_whole_and_shifted(dirs):
    ld = mixture(dirs)
    for _ in range(5):
        for x, y in ld.next_step():
            assert x.shape == y.shape == (4, T) and x.dtype == torch.int64
            assert torch.equal(x, x[:, :1] + torch.arange(T)) and torch.equal(y, x + 1)


def test_realised_proportions_within_one_percent_over_10000_windows(dirs):
    for weights in [(0.7, 0.2, 0.1), (0.34, 0.33, 0.33), (0.05, 0.9, 0.05)]:
        ld = mixture(dirs, weights=weights, g=100, micro_batch=100, seed=3)
        src, _ = ld.take_windows(10_000)
        shares = np.bincount(src, minlength=3) / 10_000
        assert np.abs(shares - np.asarray(weights)).max() < 0.01, (weights, shares)
        stats = ld.source_stats()
        assert [stats[f"s{i}"]["windows"] for i in range(3)] == np.bincount(src, minlength=3).tolist()
        assert [stats[f"s{i}"]["epoch"] for i in range(3)] == [
            c // w for c, w in zip(np.bincount(src), WINDOWS, strict=True)
        ]
    # every rank's block of a step carries the mix too (the Weyl sequence interleaves evenly)
    rows = [decode(x) for x, _ in mixture(dirs, g=100, micro_batch=25, world_size=4, rank=1).next_step()]
    assert abs(sum(s == 0 for r in rows for s, _ in r) / 25 - 0.7) <= 0.08


def test_each_source_walks_its_own_seeded_epochs(dirs):
    ld = mixture(dirs, weights=(1, 1, 1), g=30, micro_batch=30)
    rows = [r for _ in range(20) for r in step_rows(ld)]  # 600 windows: >= 3 whole epochs of every source
    for i, w in enumerate(WINDOWS):
        mine = [win for s, win in rows if s == i]
        epochs = [mine[e * w : (e + 1) * w] for e in range(len(mine) // w)]
        assert len(epochs) >= 3 and all(sorted(e) == list(range(w)) for e in epochs)
        assert epochs[0] != epochs[1], "each epoch is a fresh permutation"
    other = mixture(dirs, weights=(1, 1, 1), g=30, micro_batch=30, seed=1)
    assert [r for _ in range(20) for r in step_rows(other)] != rows


def test_ranks_split_each_step_without_overlap(dirs):
    single, _ = global_steps(dirs, 10, world_size=1, micro_batch=24)
    for world_size, micro_batch in [(2, 4), (4, 2), (3, 2)]:
        ranks = [mixture(dirs, rank=r, world_size=world_size, micro_batch=micro_batch) for r in range(world_size)]
        for step in range(10):
            parts = [step_rows(ld) for ld in ranks]
            assert len(set().union(*map(set, parts))) == 24 or len(set(single[step])) < 24
            assert [w for p in parts for w in p] == single[step], "rank-major order of the global step"


@pytest.mark.parametrize(("before", "after"), [((2, 4), (1, 8)), ((1, 8), (3, 4)), ((4, 2), (2, 12))])
def test_resume_on_other_world_size_sees_the_same_windows(dirs, before, after):
    schedule = [{"step": 9, "weights": {"s0": 0.1, "s1": 0.1, "s2": 0.8}}]
    kw = {"caps": (None, 2, None), "schedule": schedule}
    reference, ref_state = global_steps(dirs, 25, world_size=1, micro_batch=24, seed=7, **kw)
    first, state = global_steps(dirs, 11, *before, seed=7, **kw)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    rest, end = global_steps(dirs, 14, *after, state=state, seed=123, **kw)  # the state's seed wins
    assert first + rest == reference and end == ref_state


def test_epochs_cap_and_schedule(dirs):
    ld = mixture(
        dirs,
        weights=(0.6, 0.4, 0.0),
        caps=(None, 1, None),
        g=7,
        micro_batch=7,
        schedule=[{"step": 30, "weights": [0.0, 0.0, 1.0]}],
    )
    rows = [r for _ in range(30) for r in step_rows(ld)]  # 210 windows
    assert sum(s == 1 for s, _ in rows) == WINDOWS[1], "source 1 stops after one epoch; source 0 takes its share"
    assert not any(s == 2 for s, _ in rows), "weight 0 before step 30"
    assert [s for s, _ in rows[-100:]] == [0] * 100
    after = [r for _ in range(5) for r in step_rows(ld)]
    assert {s for s, _ in after} == {2}, "from step 30 the schedule's weights"
    assert ld.state_dict()["sources"]["s1"] == {"windows": WINDOWS[1], "epoch": 1}
    capped = mixture(dirs, weights=(0, 1, 0), caps=(None, 1, None), g=7, micro_batch=7)
    for _ in range(4):
        capped.next_step()  # 28 of its 30 windows
    with pytest.raises(DataError, match="reached its epochs_cap"):
        capped.next_step()


def test_state_from_another_mix_or_a_single_dataset_is_refused(dirs):
    ld = mixture(dirs)
    for _ in range(3):
        ld.next_step()
    other = mixture(dirs, weights=(0.2, 0.7, 0.1))
    with pytest.raises(DataError, match="weights, mix_schedule or epochs_cap changed"):
        other.load_state_dict(ld.state_dict())
    with pytest.raises(DataError, match="not a mixture's"):
        other.load_state_dict({"seed": 0, "epoch": 0, "windows_consumed": 5})


def test_mix_errors_say_what_to_fix(dirs, tmp_path):
    bad = tmp_path / "bytes"
    bad.mkdir()
    write_llmc(bad / "b_train_000001.bin", np.arange(100 * T))
    (bad / "meta.json").write_text(
        json.dumps(
            {
                "format": "llm.c",
                "tokenizer": "bytes",
                "vocab_size": 257,
                "eot_id": 256,
                "dtype": "uint16",
                "shards": [{"name": "b_train_000001.bin", "split": "train", "tokens": 100 * T, "sha256": None}],
                "documents": 1,
                "train_tokens": 100 * T,
                "val_tokens": 0,
                "command": None,
            }
        )
    )
    srcs, phases = parse_mix([{"dir": str(dirs[0]), "weight": 1}, {"dir": str(bad), "weight": 1}])
    with pytest.raises(DataError, match="must share one tokenizer.*'gpt2'.*'bytes'"):
        MixtureLoader(srcs, phases, seq_len=T, tokens_per_step=T * 4, micro_batch=4)
    with pytest.raises(DataError, match="repeated names"):
        parse_mix([{"dir": "a/x", "weight": 1}, {"dir": "b/x", "weight": 1}])
    with pytest.raises(DataError, match=r"data.mix\[0\] has unknown keys \['wieght'\]"):
        parse_mix([{"dir": "a", "weight": 1, "wieght": 2}])
    with pytest.raises(DataError, match="sum to 0"):
        parse_mix([{"dir": "a", "weight": 0}])
    with pytest.raises(DataError, match=r"mix_schedule\[0\].step must be"):
        parse_mix([{"dir": "a", "weight": 1}], [{"step": 0, "weights": [1]}])


# ----------------------------------------------------------------------------- config and the training loop


def test_config_takes_data_dir_or_data_mix(tmp_path):
    from train.config import ConfigError, load_config

    mix = "data.mix=[{dir: a, weight: 1}]"
    cfg = load_config(None, [mix])
    assert cfg.data.dir is None and cfg.data.mix == [{"dir": "a", "weight": 1}]
    with pytest.raises(ConfigError, match="data.dir=b and data.mix are both set"):
        load_config(None, [mix, "data.dir=b"])
    with pytest.raises(ConfigError, match="no training data"):
        load_config(None, ["data.dir=null"])
    with pytest.raises(ConfigError, match="mix_schedule changes the weights of data.mix, which is not set"):
        load_config(None, ["data.mix_schedule=[{step: 5, weights: [1]}]"])


def test_training_on_a_mix_logs_each_sources_val_loss_and_resumes(tmp_path_factory, tmp_path):
    """Per-source val losses, windows, shares and epochs in metrics.jsonl, the mixture's state in the
    checkpoint, and a run resumed at step 2 with the uninterrupted run's losses, exactly."""
    import json

    from train_helpers import metrics, prepared_dataset, tiny_config, train_losses

    from data.prepare import prepare
    from train.loop import run

    pydoc = prepared_dataset(tmp_path_factory)
    code = tmp_path / "code"
    texts = [f"def f{i}(x):\n    return x * {i}\n" for i in range(60)]
    # a train split of a few windows (most is val): the run goes through it more than once
    prepare(code, source=texts, tokenizer="bytes", progress=False, val_tokens=1500)
    code_windows = (json.loads((code / "meta.json").read_text())["train_tokens"] - 1) // 32  # seq_len 32
    mix = f"data.mix=[{{dir: {pydoc}, weight: 0.5, name: docs}}, {{dir: {code}, weight: 0.5}}]"

    def cfg(run_dir, steps):
        extra = ["data.dir=null", mix, f"train.max_steps={steps}", "train.eval_every=2", "checkpoint.every=2"]
        return tiny_config(pydoc, run_dir, *extra)  # data.dir=null: the mix replaces the dir tiny_config names

    torch.set_num_threads(1)
    run_dir, straight = tmp_path / "run", tmp_path / "straight"
    run(cfg(run_dir, 2))
    out = run(cfg(run_dir, 4))  # resumes from step 2: the mixture's state goes through the checkpoint
    run(cfg(straight, 4))
    assert train_losses(run_dir) == train_losses(straight) and sorted(train_losses(straight)) == [1, 2, 3, 4]
    evals = [r for r in metrics(run_dir) if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for r in evals:
        assert r["val_loss"] == pytest.approx(0.5 * r["val/docs"] + 0.5 * r["val/code"])
        drawn = r["step"] * 256 // 32  # windows so far: tokens_per_step / seq_len per step
        assert r["data/docs/windows"] + r["data/code/windows"] == drawn
        for name in ("docs", "code"):
            assert r[f"data/{name}/share"] == pytest.approx(r[f"data/{name}/windows"] / max(drawn, 1))
        assert r["data/code/epoch"] == r["data/code/windows"] // code_windows
    assert evals[-1]["data/code/epoch"] >= 1  # the premise: the small source wrapped around
    assert 0.4 < evals[-1]["data/code/share"] < 0.6  # ~ its weight, 0.5, over 32 windows
    assert out["val_loss"] == pytest.approx(evals[-1]["val_loss"])
    state = torch.load(run_dir / "checkpoints" / "step_000004" / "train_state.pt", weights_only=True)
    assert state["loader"]["windows_consumed"] == 32 and set(state["loader"]["sources"]) == {"docs", "code"}


def test_inspect_reports_the_runs_draw_per_source(dirs, tmp_path, capsys):
    from data.inspect import main
    from model.cli import run

    cfg = tmp_path / "mix.yaml"
    weights = (0.7, 0.2, 0.1)
    mix = [{"dir": str(d), "weight": w, "name": f"s{i}"} for i, (d, w) in enumerate(zip(dirs, weights, strict=True))]
    mix[2]["epochs_cap"] = 1
    cfg.write_text(json.dumps({"data": {"mix": mix}, "model": {"block_size": T}, "train": {"max_steps": 20}}))
    main([str(cfg), "--tokens-per-step", str(T * 10), "--windows", "1"])
    out = capsys.readouterr().out
    ld = mixture(dirs, caps=(None, None, 1), g=10, micro_batch=10)
    for _ in range(20):
        ld.next_step()
    for name, stats in ld.source_stats().items():
        w = WINDOWS[int(name[1])]
        assert f"this run draws {stats['windows']:,} windows = {stats['windows'] / w:.2f} epochs" in out
    assert "run: 20 steps x 160 tokens = 200 windows of seq_len=16" in out and out.count("  window ") == 3
    assert run(main, [str(dirs[0])], prog="data.inspect") == 2  # a user error: one line on stderr, exit code 2
    assert "data.inspect: error: give --seq-len, --tokens-per-step" in capsys.readouterr().err
    assert run(main, [str(tmp_path / "nope"), "--steps", "1"], prog="data.inspect") == 2
    assert "does not exist" in capsys.readouterr().err


def test_train_bench_runs_on_a_mix_config_with_the_mixs_vocabulary(tmp_path, capsys):
    """train.bench uses random tokens: a data.mix config (no data.dir) takes its vocabulary from the mix's
    shared meta.json, and one whose datasets are not prepared falls back to GPT-2's instead of failing."""
    from data.prepare import prepare
    from train.bench import main as bench

    for name in ("a", "b"):
        prepare(tmp_path / name, source=[f"{name} {i}" for i in range(50)], tokenizer="bytes", progress=False)
    tiny = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "train.tokens_per_step=128"]
    tiny += ["train.micro_batch=4", "--steps", "1", "--warmup", "0", "--settings", "baseline"]
    for dirs, vocab in (((tmp_path / "a", tmp_path / "b"), 257), ((tmp_path / "x", tmp_path / "y"), 50257)):
        cfg = tmp_path / "mix.yaml"
        mix = [{"dir": str(d), "weight": 0.5} for d in dirs]
        cfg.write_text(json.dumps({"data": {"dir": None, "mix": mix}, "model": {"vocab_size": None}}))
        assert bench(["--config", str(cfg), *tiny]) == 0
        out = capsys.readouterr().out
        assert f"vocab {vocab} |" in out and "fp32 eager, for-loop AdamW (baseline)" in out

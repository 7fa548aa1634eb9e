"""BatchLoader and val_batches: window layout, determinism, rank disjointness, resume across world sizes.

The dataset's token at stream position p is p itself, so a window is identified by x[b, 0] // T and
every window's content can be checked exactly, across shard boundaries included.
"""

import io

import numpy as np
import pytest
import torch

from data.errors import DataError
from data.loader import BatchLoader, val_batches
from data.permutation import Permutation

T = 16
TRAIN_SIZES = (1000, 37, 2000, 1200)  # shard lengths: boundaries fall inside windows
N_TRAIN = sum(TRAIN_SIZES)
W = (N_TRAIN - 1) // T  # 264 windows
N_VAL = 40 * T + 1


def write_llmc(path, tokens):
    header = np.zeros(256, dtype="<i4")
    header[:3] = 20240520, 1, len(tokens)
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("positions")
    write_llmc(d / "pos_val_000000.bin", np.arange(30000, 30000 + N_VAL))
    start = 0
    for i, size in enumerate(TRAIN_SIZES):
        write_llmc(d / f"pos_train_{i + 1:06d}.bin", np.arange(start, start + size))
        start += size
    return d


def loader(data_dir, *, tokens_per_step=T * 24, micro_batch=4, rank=0, world_size=1, seed=0):
    return BatchLoader(
        data_dir,
        seq_len=T,
        tokens_per_step=tokens_per_step,
        micro_batch=micro_batch,
        rank=rank,
        world_size=world_size,
        seed=seed,
    )


def step_windows(ld: BatchLoader) -> list[int]:
    """The window indices of this rank's part of the next step, in micro-step then row order."""
    return [int(w) for x, _ in ld.next_step() for w in (x[:, 0] // T).tolist()]


def global_steps(data_dir, n_steps, world_size, micro_batch, state=None, seed=0, windows_per_step=24):
    """The windows of the next n_steps global steps, ranks concatenated in rank order; and the end state."""
    ranks = [
        loader(
            data_dir,
            tokens_per_step=T * windows_per_step,
            rank=r,
            world_size=world_size,
            micro_batch=micro_batch,
            seed=seed,
        )
        for r in range(world_size)
    ]
    if state is not None:
        for ld in ranks:
            ld.load_state_dict(state)
    steps = [[w for ld in ranks for w in step_windows(ld)] for _ in range(n_steps)]
    states = [ld.state_dict() for ld in ranks]
    assert all(s == states[0] for s in states), "the state is global: every rank holds the same"
    return steps, states[0]


def test_windows_are_the_stream_shifted_by_one(data_dir):
    ld = loader(data_dir)
    assert ld.grad_accum_steps == 6 and ld.num_windows == W
    for _ in range(20):  # 480 windows: every one, shard-crossing ones included
        for x, y in ld.next_step():
            assert x.shape == y.shape == (4, T) and x.dtype == y.dtype == torch.int64
            expected = x[:, :1] + torch.arange(T)
            assert torch.equal(x, expected) and torch.equal(y, expected + 1)
            assert (x[:, 0] % T == 0).all()


def test_each_epoch_is_a_seeded_permutation(data_dir):
    ld = loader(data_dir, tokens_per_step=T * 8, micro_batch=8)  # W = 264 = 33 steps of 8
    epoch0 = [w for _ in range(33) for w in step_windows(ld)]
    assert sorted(epoch0) == list(range(W)) and ld.state_dict() == {"seed": 0, "epoch": 1, "windows_consumed": 0}
    epoch1 = [w for _ in range(33) for w in step_windows(ld)]
    assert sorted(epoch1) == list(range(W)) and epoch1 != epoch0
    again = loader(data_dir, tokens_per_step=T * 8, micro_batch=8)
    assert [w for _ in range(33) for w in step_windows(again)] == epoch0  # deterministic across runs
    other = loader(data_dir, tokens_per_step=T * 8, micro_batch=8, seed=1)
    assert [w for _ in range(33) for w in step_windows(other)] != epoch0


def test_ranks_split_each_step_without_overlap(data_dir):
    single, _ = global_steps(data_dir, 12, world_size=1, micro_batch=4)
    for world_size, micro_batch in [(2, 4), (4, 2), (3, 2)]:
        ranks = [loader(data_dir, rank=r, world_size=world_size, micro_batch=micro_batch) for r in range(world_size)]
        for step in range(12):
            parts = [step_windows(ld) for ld in ranks]
            assert all(len(p) == 24 // world_size for p in parts)
            assert len(set().union(*map(set, parts))) == 24, "no window is seen by two ranks"
            assert [w for p in parts for w in p] == single[step], "rank-major order of the global step"


@pytest.mark.parametrize(
    ("windows_per_step", "before", "after"),
    [
        (24, (2, 4), (1, 8)),
        (24, (1, 8), (2, 4)),
        (24, (2, 2), (4, 6)),
        (24, (3, 8), (1, 4)),
        (40, (2, 4), (1, 20)),
        (40, (1, 40), (4, 2)),
    ],  # 40 does not divide W: steps straddle epochs
)
def test_resume_on_other_world_size_sees_the_same_windows(data_dir, windows_per_step, before, after):
    """(world_size, micro_batch) before and after the checkpoint; tokens per step is the same."""
    g = windows_per_step
    reference, _ = global_steps(data_dir, 30, world_size=1, micro_batch=g, seed=7, windows_per_step=g)
    first, state = global_steps(data_dir, 13, *before, seed=7, windows_per_step=g)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    rest, _ = global_steps(data_dir, 17, *after, state=state, seed=123, windows_per_step=g)  # the state's seed wins
    assert first + rest == reference
    assert sorted(w for step in reference[: W // g] for w in step) == sorted(set(sum(reference[: W // g], [])))


def test_step_layout_errors_name_the_numbers(data_dir):
    with pytest.raises(ValueError, match="multiple of seq_len=16"):
        loader(data_dir, tokens_per_step=T * 24 + 1)
    with pytest.raises(ValueError, match=r"micro_batch=5 x world_size=2 = 10 .* multiple of .* = 160"):
        loader(data_dir, micro_batch=5, world_size=2)
    with pytest.raises(ValueError, match="rank=2 must be in"):
        loader(data_dir, rank=2, world_size=2)
    with pytest.raises(DataError, match="fewer than the 1000 one step needs"):
        loader(data_dir, tokens_per_step=T * 1000)


def test_load_state_dict_rejects_foreign_states(data_dir):
    ld = loader(data_dir)
    with pytest.raises(DataError, match="does not fit this split"):
        ld.load_state_dict({"seed": 0, "epoch": 0, "windows_consumed": W})
    with pytest.raises(DataError, match="must be"):
        ld.load_state_dict({"seed": 0, "epoch": 0})


def test_val_batches_walk_the_val_split_in_order(data_dir):
    one = [x for x, _ in val_batches(data_dir, seq_len=T, batch_size=4)]
    assert len(one) == 10  # 40 windows
    starts = torch.cat([x[:, 0] for x in one])
    assert torch.equal(starts, 30000 + torch.arange(40) * T)
    assert all(torch.equal(y, x + 1) for x, y in val_batches(data_dir, seq_len=T, batch_size=4, max_batches=3))
    two = [list(val_batches(data_dir, seq_len=T, batch_size=2, rank=r, world_size=2)) for r in range(2)]
    assert len(two[0]) == len(two[1]) == 10
    for k in range(10):  # batch k of both ranks together is batch k of one rank
        assert torch.equal(torch.cat([two[0][k][0], two[1][k][0]]), one[k])
    three = [list(val_batches(data_dir, seq_len=T, batch_size=4, rank=r, world_size=3)) for r in range(3)]
    assert [len(b) for b in three] == [3, 3, 3]  # the tail that cannot fill every rank is dropped
    with pytest.raises(DataError, match="fewer than one batch"):
        val_batches(data_dir, seq_len=T, batch_size=41)


def test_permutation_is_a_bijection():
    for n in [1, 2, 3, 7, 64, 65, 1000, 4097]:
        for epoch in (0, 1):
            values = Permutation(n, seed=3, epoch=epoch)[np.arange(n)]
            assert sorted(values.tolist()) == list(range(n))
    assert not np.array_equal(Permutation(1000, 3, 0)[np.arange(1000)], Permutation(1000, 3, 1)[np.arange(1000)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_arrive_on_the_device(data_dir):
    ld = BatchLoader(data_dir, seq_len=T, tokens_per_step=T * 8, micro_batch=8, device="cuda")
    cpu = BatchLoader(data_dir, seq_len=T, tokens_per_step=T * 8, micro_batch=8)
    ((x, y),) = ld.next_step()
    ((cx, cy),) = cpu.next_step()
    assert x.is_cuda and y.is_cuda
    assert torch.equal(x.cpu(), cx) and torch.equal(y.cpu(), cy)

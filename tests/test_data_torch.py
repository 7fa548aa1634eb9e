"""data/torch_data.py: the map-style window Dataset, and the stream IterableDataset that DataLoader workers
(real processes) turn into exactly BatchLoader's / MixtureLoader's micro-batches, resumable after prefetching."""

from __future__ import annotations

import functools
import io

import numpy as np
import pytest
import torch
from test_data_loader import write_llmc
from torch.utils.data import DataLoader

from data.errors import DataError
from data.loader import BatchLoader
from data.mixture import MixtureLoader, parse_mix
from data.torch_data import StreamDataLoader, StreamDataset, WindowDataset

T = 16


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    out = []
    for i, n in enumerate((1500, 900)):
        d = tmp_path_factory.mktemp(f"torch{i}")
        write_llmc(d / "p_val_000000.bin", 40000 + np.arange(20 * T + 1))
        write_llmc(d / "p_train_000001.bin", 20000 * i + np.arange(n))
        write_llmc(d / "p_train_000002.bin", 20000 * i + np.arange(n, 2 * n))  # windows cross the boundary
        out.append(d)
    return out


def makers(dirs):
    plain = functools.partial(BatchLoader, dirs[0], seq_len=T, tokens_per_step=T * 12, micro_batch=3, seed=5)
    mix = functools.partial(
        MixtureLoader,
        *parse_mix([{"dir": str(dirs[0]), "weight": 2}, {"dir": str(dirs[1]), "weight": 1, "name": "b"}]),
        seq_len=T,
        tokens_per_step=T * 12,
        micro_batch=2,
        rank=1,
        world_size=2,
    )
    return {"plain": plain, "mix": mix}


def reference(make, steps: int) -> list[torch.Tensor]:
    ld = make()
    return [x for _ in range(steps) for x, _ in ld.next_step()]


def take(dl, n: int) -> list[torch.Tensor]:
    out = []
    for x, y in dl:
        assert torch.equal(y[:, :-1], x[:, 1:])
        out.append(x)
        if len(out) == n:
            break
    return out


def test_window_dataset_is_the_split_shifted_by_one(dirs):
    ds = WindowDataset(dirs[0], "train", seq_len=T)
    assert len(ds) == (3000 - 1) // T
    x, y = ds[len(ds) - 1]
    assert torch.equal(x, (len(ds) - 1) * T + torch.arange(T)) and torch.equal(y, x + 1)
    batches = list(DataLoader(ds, batch_size=8, num_workers=2))
    assert torch.equal(torch.cat([b[0] for b in batches])[:, 0], torch.arange(len(ds)) * T)
    assert len(WindowDataset(dirs[0], "val", seq_len=T)) == 20
    with pytest.raises(IndexError):
        ds[len(ds)]


@pytest.mark.slow  # DataLoader worker processes
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")  # 4 workers on a 2-core CI
@pytest.mark.parametrize("kind", ["plain", "mix"])
def test_dataloader_workers_yield_the_loaders_batches_in_order(dirs, kind):
    make = makers(dirs)[kind]
    ref = reference(make, 6)  # 24 micro-batches (plain: A = 4; mix: A = 3 per rank)
    for k in (0, 1, 2, 4):
        got = take(StreamDataLoader(StreamDataset(make), num_workers=k, pin_memory=torch.cuda.is_available()), len(ref))
        assert len(got) == len(ref) and all(torch.equal(a, b) for a, b in zip(got, ref, strict=True)), k


@pytest.mark.slow  # DataLoader worker processes
@pytest.mark.parametrize("kind", ["plain", "mix"])
def test_state_resumes_exactly_after_workers_prefetched(dirs, kind):
    make = makers(dirs)[kind]
    ref = reference(make, 8)
    dl = StreamDataLoader(StreamDataset(make), num_workers=2, prefetch_factor=4)
    first = take(dl, 7)  # not a step boundary; the workers have read ahead by several batches
    state = dl.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    again = StreamDataLoader(StreamDataset(make), num_workers=1)
    again.load_state_dict(state)
    rest = take(again, len(ref) - 7)
    assert all(torch.equal(a, b) for a, b in zip(first + rest, ref, strict=True))
    # another pass over the same loader continues where the caller stopped
    assert torch.equal(take(dl, 1)[0], ref[7])
    # at a step boundary the state's loader entry is the training loader's own state
    ld = make()
    for _ in range(2):
        ld.next_step()
    fresh = StreamDataLoader(StreamDataset(make))
    take(fresh, 2 * ld.grad_accum_steps)
    assert fresh.state_dict() == {"loader": ld.state_dict(), "micro_batches": 0}
    with pytest.raises(DataError, match="stream state must be"):
        fresh.load_state_dict({"micro_batches": 1})


@pytest.mark.slow  # a subprocess with DataLoader workers
def test_the_docs_hand_written_loop_runs(tmp_path_factory, tmp_path):
    """docs/data.md's ```python block that trains the GPT through StreamDataLoader, run as written."""
    import re
    import subprocess
    import sys

    from train_helpers import REPO, prepared_dataset

    doc = (REPO / "docs" / "data.md").read_text()
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if "StreamDataLoader(" in b]
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "pydoc-bytes").symlink_to(prepared_dataset(tmp_path_factory))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    loss = float(re.search(r"val loss after 30 steps: ([\d.]+)", proc.stdout).group(1))
    assert loss < 4.0, proc.stdout  # it learned: log(257) = 5.55 is the untrained loss

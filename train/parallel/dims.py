"""The device mesh: the degrees of each parallel dimension, their check, and the one DeviceMesh.

Dimensions, outermost first (torchtitan's ParallelDims, torchtitan/distributed/parallel_dims.py):
    pp            pipeline stages (helper module train/parallel/pipeline.py)
    dp_replicate  data parallel, whole replicas (DDP; HSDP's replica groups across nodes)
    dp_shard      data parallel with FSDP2 sharding of parameters, gradients and optimizer state
    cp            context parallel: each rank holds a slice of the sequence (train/parallel/context.py)
    tp            tensor parallel (Megatron-style, with sequence parallel); innermost, so that its heavy
                  per-layer collectives stay inside a node
    ep            expert parallel (train/parallel/expert.py): not a dimension of its own but a split of
                  dp_shard x cp into (ranks holding the same experts) x ep, as torchtitan borrows it;
                  each ep rank holds n_experts / ep experts of every MoE block
A rank's coordinates follow from its global rank alone (row-major over the dims above), so the loader
can be told its data-parallel rank before any process group exists. Every dimension is kept in the
mesh, degree 1 included (torchtitan does the same), so submesh names never depend on the layout.
Flattened submeshes: "dp" (dp_replicate x dp_shard: the loader's ranks, the loss mean), "dp_shard_cp"
(what FSDP shards over), "dp_cp" (gradient and loss reduction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from train.errors import ConfigError

DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


class MeshError(ConfigError):
    """Degrees that do not describe a layout of this world or model; says what to set (exit 2)."""


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    pp: int = 1
    world_size: int = 1
    rank: int = 0  # this process's global rank: the coordinates below are its
    pp_stages_per_rank: int = 1  # pipeline stages each pp rank holds (2 for interleaved 1F1B)
    ep: int = 1  # expert parallel degree, borrowed from dp_shard x cp (not a factor of the world size)

    def __post_init__(self) -> None:
        degrees = {d: getattr(self, d) for d in DIMS}
        rest = [d for d, v in degrees.items() if v == -1]
        bad = [f"parallel.{d}={v}" for d, v in degrees.items() if not isinstance(v, int) or (v < 1 and v != -1)]
        if bad:
            raise MeshError(f"{', '.join(bad)}: each degree is a positive integer (or -1 for the rest of the world)")
        if len(rest) > 1:
            raise MeshError(f"only one degree may be -1 (the rest); got {', '.join('parallel.' + d for d in rest)}")
        fixed = math.prod(v for v in degrees.values() if v != -1)
        if rest:
            if self.world_size % fixed:
                raise MeshError(
                    f"the world size {self.world_size} is not a multiple of {fixed} "
                    f"({self.describe(skip=rest[0])}); launch a multiple of {fixed} processes"
                )
            object.__setattr__(self, rest[0], self.world_size // fixed)
        elif fixed != self.world_size:
            raise MeshError(
                f"the parallel degrees multiply to {fixed} ({self.describe()}) but {self.world_size} process(es) "
                f"run; make their product the world size, or set one of them to -1 (the rest)"
            )
        self.check_ep()

    def check_ep(self) -> None:
        """ep splits dp_shard x cp (torchtitan's rule before it let ep take tp ranks as well)."""
        if not isinstance(self.ep, int) or self.ep < 1:
            raise MeshError(f"parallel.ep={self.ep}: the expert parallel degree is a positive integer")
        if (self.dp_shard * self.cp) % self.ep:
            raise MeshError(
                f"parallel.ep={self.ep} must divide dp_shard x cp = {self.dp_shard * self.cp} (expert parallel "
                "borrows its ranks from the sharded data-parallel ones); raise parallel.dp_shard or lower parallel.ep"
            )
        if self.ep > 1 and self.pp > 1:
            raise MeshError(f"parallel.ep={self.ep} with parallel.pp={self.pp} is not supported; set one of them to 1")

    @classmethod
    def from_options(cls, strategy: str, options: dict, world_size: int, rank: int = 0) -> ParallelDims:
        """The degrees of the config's parallel section. The shorthands: ddp = dp_replicate takes the
        rest of the world, fsdp = dp_shard does; none = every degree as given (all 1 by default). The
        separate data-parallel engine (parallel.strategy=deepspeed) is laid out as ddp."""
        degrees = {d: int(options.get(d, 1) if options.get(d) is not None else 1) for d in DIMS}
        if strategy != "none":
            key = "dp_shard" if strategy == "fsdp" else "dp_replicate"
            if degrees[key] == 1 and -1 not in degrees.values():
                degrees[key] = -1
        stages = int(options.get("pp_stages_per_rank") or 1)
        ep = int(options.get("ep") or 1)
        return cls(world_size=world_size, rank=rank, pp_stages_per_rank=stages, ep=ep, **degrees)

    def describe(self, skip: str | None = None) -> str:
        dims = [f"{d}={getattr(self, d)}" for d in DIMS if d != skip and getattr(self, d) != 1]
        return " x ".join(dims + ([f"ep={self.ep}"] if self.ep > 1 else [])) or "1"

    # ---- sizes --------------------------------------------------------------------------
    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def dp_cp_size(self) -> int:
        return self.dp_size * self.cp

    @property
    def shard_size(self) -> int:
        """The ranks FSDP shards over: dp_shard x cp (the "dp_shard_cp" submesh)."""
        return self.dp_shard * self.cp

    @property
    def shards_params(self) -> bool:
        """Whether a rank holds only part of some parameter (FSDP or TP): the weights live in state/."""
        return self.shard_size > 1 or self.tp > 1

    @property
    def uses_fsdp(self) -> bool:
        """FSDP2 over dp_shard_cp (HSDP when dp_replicate > 1); pure replication otherwise. DDP cannot
        compose with another mesh dimension (torchtitan neither), so tp / cp / pp with replicas only
        use fully_shard on a replicate x shard mesh whose shard degree may be 1."""
        return self.shard_size > 1 or (self.dp_replicate > 1 and (self.tp > 1 or self.pp > 1))

    # ---- this rank's place, from the global rank alone ----------------------------------
    def coords(self, rank: int | None = None) -> dict[str, int]:
        """{dim: the rank's index in it} (default: this process's); row-major over DIMS, as
        init_device_mesh lays ranks out."""
        rank = self.rank if rank is None else rank
        out = {}
        for d in reversed(DIMS):
            n = getattr(self, d)
            out[d] = rank % n
            rank //= n
        return {d: out[d] for d in DIMS}

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel ranks: the loader's rank."""
        c = self.coords()
        return c["dp_replicate"] * self.dp_shard + c["dp_shard"]

    @property
    def ep_rank(self) -> int:
        """This rank's index in its ep group: ep is the innermost factor of dp_shard x cp (expert.py)."""
        c = self.coords()
        return (c["dp_shard"] * self.cp + c["cp"]) % self.ep

    @property
    def rng_rank(self) -> int:
        """Which dropout stream this rank draws (the loop seeds train.seed + rng_rank): one per
        data-parallel rank and, within it, per cp rank (each holds its own tokens) and per pp rank
        (each holds its own layers; Megatron-LM offsets its seed by the pipeline rank too). The ranks
        of one tp group share it: tensor parallel's replicated activations need the same masks on
        every tp rank. Without cp and pp, the data-parallel rank."""
        return self.dp_rank + self.dp_size * (self.cp_rank + self.cp * self.pp_rank)

    @property
    def cp_rank(self) -> int:
        return self.coords()["cp"]

    @property
    def tp_rank(self) -> int:
        return self.coords()["tp"]

    @property
    def pp_rank(self) -> int:
        return self.coords()["pp"]

    # ---- the mesh -------------------------------------------------------------------------
    def build_mesh(self, device_type: str):
        """One DeviceMesh over every rank with the dims above, plus the flattened submeshes "dp",
        "dp_shard_cp" and "dp_cp" (reachable as mesh["dp"] etc.). Needs the process group."""
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device_type, tuple(getattr(self, d) for d in DIMS), mesh_dim_names=DIMS)
        mesh["dp_replicate", "dp_shard"]._flatten("dp")
        mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
        return mesh


def check_ep(dims, cfg) -> None:
    """Expert parallel shards the experts of a mixture of experts over the torch-native mesh."""
    ep = getattr(dims, "ep", 1) or 1
    if ep == 1:
        return
    if not cfg.n_experts:
        raise MeshError(f"parallel.ep={ep} shards experts but the model is dense; set model.n_experts or parallel.ep=1")
    if cfg.n_experts % ep:
        raise MeshError(
            f"parallel.ep={ep} must divide model.n_experts={cfg.n_experts} (each ep rank holds n_experts / ep)"
        )


def check_model(dims, cfg, seq_len: int) -> None:
    """What the degrees (a ParallelDims, or the config's parallel section) ask of the model (a
    ModelConfig) and the sequence, one line each: tensor parallel splits heads, MLP width and the
    vocabulary; context parallel cuts the sequence into 2 x cp chunks (the load-balanced causal layout);
    pipeline parallel needs a block per stage. A degree of -1 (not known before launch) is not checked."""
    tp, cp = dims.tp, dims.cp
    check_ep(dims, cfg)
    if tp > 1:
        sizes = [
            ("model.n_head", cfg.n_head),
            ("model.n_kv_head", cfg.n_kv_head),
            ("the MLP width (model.hidden_dim)", cfg.hidden_dim),
        ]
        if cfg.vocab_size is not None:  # null: the dataset's, checked at start-up
            sizes.append(("model.vocab_size (padded)", cfg.padded_vocab_size))
        for what, n in sizes:
            if n % tp:
                raise MeshError(f"parallel.tp={tp} must divide {what} = {n}; choose a tp that divides it")
        if seq_len % tp:
            raise MeshError(
                f"data.seq_len={seq_len} must be divisible by parallel.tp={tp} (sequence parallel gives each tp "
                "rank an equal slice of every window); choose another seq_len or tp"
            )
    if cp > 1 and seq_len % (2 * cp):
        raise MeshError(
            f"data.seq_len={seq_len} must be divisible by 2 x parallel.cp = {2 * cp} (each cp rank holds two "
            "chunks of the sequence); choose another seq_len or cp"
        )
    if dims.pp > 1:  # at least a block per stage
        try:
            check_split(cfg.n_layer, dims.pp, dims.pp_stages_per_rank)
        except ValueError as e:
            raise MeshError(str(e)) from None


def check_async_tp(tp: int, compile: bool, device: str) -> None:
    """What parallel.async_tp asks of the run, one line each: a tp group whose collectives it overlaps,
    the compiled blocks that inductor's micro-pipeline TP pass rewrites, and CUDA (the fused kernels
    work on symmetric memory). tp -1 and device "auto" (not known before launch) pass here and are
    checked again at start-up with the resolved values."""
    if tp == 1:
        raise MeshError(
            "parallel.async_tp=true overlaps tensor parallel's collectives with its matmuls: set parallel.tp > 1, "
            "or parallel.async_tp=false"
        )
    if not compile:
        raise MeshError(
            "parallel.async_tp=true is a pass of torch.compile (inductor) over the compiled blocks: set "
            "train.compile=true, or parallel.async_tp=false"
        )
    if device != "auto" and not device.startswith("cuda"):
        raise MeshError(
            f"parallel.async_tp=true needs CUDA GPUs (symmetric memory), and this run is on {device}: set "
            "parallel.async_tp=false"
        )


def check_split(n_layer: int, pp: int, stages_per_rank: int) -> None:
    """Raise ValueError (one line that says what to change) for a model the pipeline stages
    (train/parallel/pipeline.py) cannot split."""
    stages = pp * stages_per_rank
    if n_layer < stages:
        raise ValueError(
            f"model.n_layer={n_layer} is fewer than the {stages} pipeline stages "
            f"(parallel.pp={pp} x parallel.pp_stages_per_rank={stages_per_rank}): lower them or add layers"
        )

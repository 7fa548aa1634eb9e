#!/usr/bin/env bash
# The front door of every training run.
#
#   bash launch.sh --demo                                  prepare the embedded corpus, train configs/debug.yaml
#                                                          on the CPU, compare with a unigram model, sample
#   bash launch.sh configs/X.yaml [section.key=value ...]  one process on the CPU or the only GPU;
#                                                          every GPU of the machine when there are several
#   bash launch.sh --nproc N configs/X.yaml [...]          N processes on this machine (torchrun --standalone;
#                                                          gloo on CPU, NCCL on GPU)
#
# With several processes and a config whose parallel.strategy is none, ddp is used (and said so); a
# distributed strategy always runs under torchrun, even for one process.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 MASTER_PORT=29500 bash launch.sh configs/X.yaml
#                                                          multi-node: run the same line on every node
#                                                          (NODE_RANK 0..NNODES-1); NPROC per node as above
#   sbatch configs/slurm-2node.sbatch                      SLURM: with SLURM_JOB_ID set, NNODES, NODE_RANK,
#                                                          MASTER_ADDR, MASTER_PORT and the GPUs per node come
#                                                          from SLURM's variables (one task per node)
#   bash launch.sh --deepspeed configs/X.yaml [...]        parallel.strategy=deepspeed
#   bash launch.sh --max-restarts K configs/X.yaml [...]   restart the job up to K times when a rank fails
#                                                          (torchrun's elastic restarts, also for one process;
#                                                          each restart resumes from the latest checkpoint;
#                                                          multi-node: c10d rendezvous at MASTER_ADDR)
#
# Environment: PYTHON (default python), TORCHRUN (default: PYTHON -m train.torchrun, torchrun less its own
# traceback when a rank fails), and for multi-node NNODES, NODE_RANK,
# MASTER_ADDR, MASTER_PORT (set by hand, or derived from SLURM_* under SLURM).
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python}
# torchrun as an array: by default `python -m train.torchrun` (train/torchrun.py), a file path if TORCHRUN is set.
if [[ -n ${TORCHRUN:-} ]]; then TORCHRUN_CMD=("$TORCHRUN"); else TORCHRUN_CMD=("$PYTHON" -m train.torchrun); fi

usage() {
    sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'
}

die() {
    echo "launch.sh: $*" >&2
    exit 2
}

# ---------------------------------------------------------------------------- the demo
demo() {
    local data=datasets/pydoc-bytes run=runs/debug
    if [[ ! -f $data/meta.json ]]; then
        echo "== preparing the embedded corpus (pydoc, bytes tokenizer) in $data"
        "$PYTHON" -m data.prepare --source pydoc --tokenizer bytes --out "$data"
    fi
    echo "== the baseline: a unigram model of the corpus"
    "$PYTHON" -m train.unigram "$data"
    echo "== training configs/debug.yaml on the CPU (a few minutes on 2 cores)"
    # Ctrl-C: training saves a checkpoint and exits 0; stop the demo there too (rerun to resume).
    trap 'echo "launch.sh: demo interrupted; run it again to resume from the checkpoint" >&2; exit 130' INT TERM
    "$PYTHON" -m train --config configs/debug.yaml train.device=cpu "data.dir=$data" "train.run_dir=$run" "$@"
    trap - INT TERM
    echo "== result"
    "$PYTHON" -m train.unigram "$data" --run "$run"
    local ckpt=$run/checkpoints/best
    [[ -e $ckpt ]] || ckpt=$run
    echo "== a sample from $ckpt"
    if "$PYTHON" -c "import eval.sample" 2>/dev/null; then
        "$PYTHON" -m eval.sample --ckpt "$ckpt" --prompt "The " --max-new-tokens 250 --temperature 0.8 --top-k 50
    else
        "$PYTHON" -m train.sample --ckpt "$ckpt" --prompt "The " --max-new-tokens 250
    fi
}

# ---------------------------------------------------------------------------- helpers
gpu_count() {
    "$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null \
        || echo 0
}

# Under SLURM (SLURM_JOB_ID set), derive torchrun's multi-node settings from SLURM's variables unless
# they were given: one task per node (srun --ntasks-per-node=1), torchrun spawns the ranks of its node.
from_slurm() {
    [[ -n ${SLURM_JOB_ID:-} ]] || return 0
    NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}
    NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
    if [[ -z ${MASTER_ADDR:-} ]]; then
        if command -v scontrol >/dev/null 2>&1; then
            MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
        elif [[ ${SLURM_JOB_NODELIST:-} != *"["* ]]; then
            MASTER_ADDR=${SLURM_JOB_NODELIST%%,*}  # a plain comma-separated list: its first host
        else
            die "cannot expand SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST:-} without scontrol; set MASTER_ADDR"
        fi
    fi
    # A port derived from the job id, so that two jobs sharing a node do not collide.
    MASTER_PORT=${MASTER_PORT:-$(( 20000 + ${SLURM_JOB_ID} % 20000 ))}
    if [[ -z $NPROC && -n ${SLURM_GPUS_ON_NODE:-} ]]; then NPROC=${SLURM_GPUS_ON_NODE%%(*}; fi
}

# The parallel.strategy the config resolves to, and "mesh" in its place when strategy is none but a mesh
# degree (parallel.dp_replicate / dp_shard / tp / cp / pp) is not 1 (this also reports a bad config key, exit 2).
resolved_strategy() {
    local out strategy
    out=$("$PYTHON" -m train --print-config "$@") || exit $?
    strategy=$(sed -n 's/^  strategy: //p' <<<"$out")
    if [[ $strategy == none ]] && grep -Eq '^  (dp_replicate|dp_shard|tp|cp|pp): (-1|[2-9]|[1-9][0-9]+)$' <<<"$out"; then
        strategy=mesh
    fi
    echo "$strategy"
}

# ---------------------------------------------------------------------------- launchers
# launch LAUNCHER NPROC CONFIG [overrides...]
launch() {
    local launcher=$1 nproc=$2 config=$3
    shift 3
    case $launcher in
        single)
            echo "+ $PYTHON -m train --config $config $*" >&2
            exec "$PYTHON" -m train --config "$config" "$@"
            ;;
        torchrun)
            local opts=(--standalone --nproc_per_node="$nproc" "${RESTARTS[@]}")
            echo "+ torchrun ${opts[*]} -m train --config $config $*" >&2
            exec "${TORCHRUN_CMD[@]}" "${opts[@]}" -m train --config "$config" "$@"
            ;;
        multinode)
            # Static rendezvous at MASTER_ADDR:MASTER_PORT; every node runs this same line. Restarts need
            # the c10d rendezvous: a static one cannot re-form the group after a node's workers failed.
            local rdzv=(--nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR"
                        --master_port="$MASTER_PORT" --nproc_per_node="$nproc")
            if (( MAX_RESTARTS > 0 )); then
                rdzv=(--nnodes="$NNODES" --nproc_per_node="$nproc" --rdzv-backend=c10d
                      --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="${SLURM_JOB_ID:-gptrain}"
                      "${RESTARTS[@]}")
            fi
            echo "+ torchrun ${rdzv[*]} -m train --config $config $*" >&2
            exec "${TORCHRUN_CMD[@]}" "${rdzv[@]}" -m train --config "$config" "$@"
            ;;
        *)
            die "unknown launcher $launcher"
            ;;
    esac
}

# ---------------------------------------------------------------------------- arguments
MODE=run
NPROC=""
DEEPSPEED=0
MAX_RESTARTS=0
while (( $# )); do
    case $1 in
        --demo) MODE=demo; shift ;;
        --deepspeed) DEEPSPEED=1; shift ;;
        --nproc) [[ $# -ge 2 ]] || die "--nproc needs a number"; NPROC=$2; shift 2 ;;
        --nproc=*) NPROC=${1#*=}; shift ;;
        --max-restarts) [[ $# -ge 2 ]] || die "--max-restarts needs a number"; MAX_RESTARTS=$2; shift 2 ;;
        --max-restarts=*) MAX_RESTARTS=${1#*=}; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        -*) die "unknown option $1 (see bash launch.sh --help)" ;;
        *) break ;;
    esac
done

if [[ $MODE == demo ]]; then
    demo "$@"
    exit 0
fi

(( $# )) || { usage >&2; exit 2; }
CONFIG=$1
shift
[[ -f $CONFIG ]] || die "config file $CONFIG not found (see configs/)"
[[ -z $NPROC || $NPROC =~ ^[1-9][0-9]*$ ]] || die "--nproc must be a positive integer, got '$NPROC'"
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "--max-restarts must be an integer >= 0, got '$MAX_RESTARTS'"
RESTARTS=()
if (( MAX_RESTARTS > 0 )); then
    RESTARTS=(--max-restarts="$MAX_RESTARTS")
    # The workers' process group must not share the rendezvous' TCP store: a restarted group would read
    # the dead attempt's addresses from it and fail to connect (https://github.com/pytorch/pytorch/issues/135712).
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
fi

(( DEEPSPEED )) && set -- "$@" parallel.strategy=deepspeed
from_slurm
NNODES=${NNODES:-1}
[[ $NNODES =~ ^[1-9][0-9]*$ ]] || die "NNODES must be a positive integer, got '$NNODES'"
if (( NNODES > 1 )); then
    [[ -n ${NODE_RANK:-} && -n ${MASTER_ADDR:-} ]] \
        || die "NNODES=$NNODES needs NODE_RANK and MASTER_ADDR (and MASTER_PORT, default 29500) on every node"
    MASTER_PORT=${MASTER_PORT:-29500}
fi
if [[ -z $NPROC ]]; then
    GPUS=$(gpu_count)
    NPROC=$(( GPUS > 1 ? GPUS : 1 ))
fi
[[ $NPROC =~ ^[1-9][0-9]*$ ]] || die "processes per node must be a positive integer, got '$NPROC'"
STRATEGY=$(resolved_strategy --config "$CONFIG" "$@")
if (( NPROC * NNODES > 1 )) && [[ $STRATEGY == none ]]; then
    echo "launch.sh: $(( NPROC * NNODES )) processes and parallel.strategy none: adding parallel.strategy=ddp" >&2
    set -- "$@" parallel.strategy=ddp
    STRATEGY=ddp
fi
# A distributed strategy needs torchrun's environment even for one process.
if (( NNODES > 1 )); then LAUNCHER=multinode
elif [[ $STRATEGY == none ]] && (( MAX_RESTARTS == 0 )); then LAUNCHER=single  # restarts need torchrun
else LAUNCHER=torchrun; fi
launch "$LAUNCHER" "$NPROC" "$CONFIG" "$@"

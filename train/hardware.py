"""The accelerator table: dense peak FLOP/s, memory and links of the GPUs the planner and MFU know.

Every figure is the vendor's datasheet's. Datasheets print tensor-core rates "with sparsity" (2:4
structured sparsity, which training does not use); the dense rate is half of it, and that is the one
here. Links are per GPU and per direction: NVIDIA's "NVLink 900 GB/s" is both directions together,
so 450 GB/s each way, the rate one direction of a ring collective can use. Nothing here is measured:
a device that is not in the table gets its peak from a matmul measured at start-up
(train/metrics.py), never a guess.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    key: str  # the planner's --gpu name
    name: str
    match: tuple[str, ...]  # lower-case substrings of torch.cuda.get_device_name() that identify it
    bf16_tflops: float  # dense bf16 (fp16 where the GPU has no bf16) tensor-core peak
    fp8_tflops: float | None  # dense fp8 tensor-core peak; None: no fp8 units
    memory_gib: float  # memory per GPU (the datasheet's GB, as torch reports it on the device)
    link_gbps: float  # GB/s per direction between the GPUs of one node (NVLink, Infinity Fabric or PCIe)
    source: str  # the datasheet
    tf32: bool = True  # float32 matmuls on tensor cores (Ampere and later); else float32 is measured


H100_SHEET = "https://www.nvidia.com/en-us/data-center/h100/ (H100 datasheet)"
H200_SHEET = "https://www.nvidia.com/en-us/data-center/h200/ (H200 datasheet)"
A100_SHEET = "https://www.nvidia.com/en-us/data-center/a100/ (A100 datasheet)"

# Most specific match first: "h100 nvl" and "h100 pcie" before the bare "h100" (the SXM part's name,
# e.g. "NVIDIA H100 80GB HBM3").
GPUS: tuple[GPU, ...] = (
    GPU("gh200", "NVIDIA GH200 (H100 tensor cores)", ("gh200",), 989.0, 1979.0, 96, 450, H100_SHEET),
    GPU("h200-nvl", "NVIDIA H200 NVL", ("h200 nvl",), 835.5, 1670.5, 141, 450, H200_SHEET),
    GPU("h200", "NVIDIA H200 SXM", ("h200",), 989.5, 1979.0, 141, 450, H200_SHEET),
    GPU("h100-nvl", "NVIDIA H100 NVL", ("h100 nvl",), 835.5, 1670.5, 94, 300, H100_SHEET),
    # PCIe card: 1,513 / 3,026 TFLOPS with sparsity; PCIe Gen5 x16 is 64 GB/s each way (NVLink bridges
    # pair two cards only, so a node's collectives run over PCIe).
    GPU("h100-pcie", "NVIDIA H100 PCIe", ("h100 pcie",), 756.5, 1513.0, 80, 64, H100_SHEET),
    # SXM5: 1,979 bf16 / 3,958 fp8 TFLOPS with sparsity; NVLink 4 900 GB/s both directions.
    GPU("h100-sxm", "NVIDIA H100 SXM", ("h100", "h800"), 989.5, 1979.0, 80, 450, H100_SHEET),
    # HGX B200 datasheet, 8 GPUs: 36 PFLOPS bf16 and 72 PFLOPS fp8 with sparsity, 1.44 TB memory;
    # NVLink 5 is 1.8 TB/s per GPU both directions.
    GPU(
        "b200",
        "NVIDIA B200",
        ("b200",),
        2250.0,
        4500.0,
        180,
        900,
        "https://www.nvidia.com/en-us/data-center/hgx/ (HGX B200 datasheet)",
    ),
    GPU(
        "a100-40g",
        "NVIDIA A100 40GB SXM",
        ("a100-sxm4-40gb", "a100-pcie-40gb", "a100 40gb"),
        312.0,
        None,
        40,
        300,
        A100_SHEET,
    ),
    GPU("a100-80g", "NVIDIA A100 80GB SXM", ("a100", "a800"), 312.0, None, 80, 300, A100_SHEET),
    # L40S: 362.05 dense bf16 (733 with sparsity), 733 dense fp8; 48 GB GDDR6; PCIe Gen4 x16, no NVLink.
    GPU(
        "l40s",
        "NVIDIA L40S",
        ("l40s",),
        362.05,
        733.0,
        48,
        32,
        "https://www.nvidia.com/en-us/data-center/l40s/ (L40S datasheet)",
    ),
    # MI300X: 1,307.4 dense bf16, 2,614.9 dense fp8 TFLOPS; 192 GB HBM3; 7 Infinity Fabric links of
    # 128 GB/s (64 GB/s each way) to the other 7 GPUs of a node: 448 GB/s each way in all.
    GPU(
        "mi300x",
        "AMD Instinct MI300X",
        ("mi300x",),
        1307.4,
        2614.9,
        192,
        448,
        "https://www.amd.com/en/products/accelerators/instinct/mi300/mi300x.html (MI300X datasheet)",
    ),
    # Smaller parts the MFU line still names (no planner use intended, same datasheet rule).
    GPU("l40", "NVIDIA L40", ("l40",), 181.0, 362.0, 48, 32, "https://www.nvidia.com/en-us/data-center/l40/"),
    GPU("l4", "NVIDIA L4", ("l4",), 121.0, 242.5, 24, 32, "https://www.nvidia.com/en-us/data-center/l4/"),
    GPU(
        "a10",
        "NVIDIA A10",
        ("a10g", "a10"),
        125.0,
        None,
        24,
        32,
        "https://www.nvidia.com/en-us/data-center/products/a10-gpu/",
    ),
    GPU(
        "a6000",
        "NVIDIA RTX A6000",
        ("a6000",),
        154.8,
        None,
        48,
        56,
        "https://www.nvidia.com/en-us/design-visualization/rtx-a6000/",
    ),
    GPU("a40", "NVIDIA A40", ("a40",), 149.7, None, 48, 56, "https://www.nvidia.com/en-us/data-center/a40/"),
    # GeForce: the fp32-accumulate rate (torch accumulates in fp32), from the Ada / Ampere whitepapers.
    GPU(
        "rtx4090",
        "NVIDIA GeForce RTX 4090",
        ("rtx 4090",),
        165.2,
        330.3,
        24,
        32,
        "NVIDIA Ada Lovelace architecture whitepaper",
    ),
    GPU("rtx3090", "NVIDIA GeForce RTX 3090", ("rtx 3090",), 71.0, None, 24, 32, "NVIDIA Ampere GA102 whitepaper"),
    GPU(
        "v100",
        "NVIDIA V100 SXM2 (fp16)",
        ("v100",),
        125.0,
        None,
        32,
        150,
        "https://www.nvidia.com/en-us/data-center/v100/",
        False,
    ),
    GPU(
        "t4",
        "NVIDIA T4 (fp16)",
        ("t4",),
        65.0,
        None,
        16,
        16,
        "https://www.nvidia.com/en-us/data-center/tesla-t4/",
        False,
    ),
)

# Between nodes: one 400 Gb/s NIC per GPU (InfiniBand NDR / ConnectX-7, the DGX H100 and HGX B200
# layout): 50 GB/s each way. Clusters differ; the planner takes --inter-bw to say what yours has.
NETWORK_GBPS = 50.0

BY_KEY = {g.key: g for g in GPUS}


def find_gpu(device_name: str) -> GPU | None:
    """The table's entry for a torch.cuda.get_device_name(), or None."""
    lname = device_name.lower()
    for g in GPUS:
        if any(m in lname for m in g.match):
            return g
    return None


def peak_tflops(gpu: GPU, dtype: str) -> float | None:
    """Dense tensor-core TFLOP/s for a run's dtype: bf16 and fp16 at the bf16 rate, float32 as TF32 at
    half of it (Ampere and later datasheets: A100 156 vs 312, H100 495 vs 989; None before Ampere), fp8 at the fp8 rate
    (None where the GPU has no fp8 units)."""
    if dtype in ("float8", "fp8"):
        return gpu.fp8_tflops
    if dtype == "float32" and not gpu.tf32:
        return None
    return gpu.bf16_tflops * (0.5 if dtype == "float32" else 1.0)

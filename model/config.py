"""ModelConfig: every number that shapes the network, and the named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

FAMILIES = ("gpt2", "modern")
MLPS = ("gelu", "swiglu", "relu2")
MOE_ROUTERS = ("softmax", "sigmoid")


@dataclass
class ModelConfig:
    """Every field is also a training config key (`model.<field>` in YAML or on the command line)."""

    # The real vocabulary; logits never extend past it. None: not known yet -- a training config's
    # `model.vocab_size: null` means "the dataset's", filled in from meta.json before the model is built.
    vocab_size: int | None = 50257
    block_size: int = 1024  # context length
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention (query) heads; n_embd must divide into them
    n_kv_head: int | None = None  # grouped-query attention (Ainslie et al. 2023); None = n_head
    n_embd: int = 768  # residual stream width
    # "gpt2": learned positions, LayerNorm, GELU MLP (Radford et al. 2019).
    # "modern": RoPE (Su et al. 2021), RMSNorm (Zhang & Sennrich 2019),
    #           SwiGLU (Shazeer 2020), GQA -- the LLaMA recipe.
    family: str = "gpt2"
    ffn_hidden: int | None = None  # None: 4*n_embd (gelu, relu2) or ~8/3*n_embd rounded to 64 (swiglu)
    bias: bool = True  # biases in Linear layers and LayerNorm (GPT-2 has them)
    tie_embeddings: bool = True  # lm_head shares the token embedding (GPT-2 does)
    dropout: float = 0.0  # on embeddings, attention weights and residual branches, in training only
    # Pad the embedding / lm_head rows to a multiple of this (64 turns GPT-2's 50257 into nanoGPT's
    # 50304, which GPU matmuls tile evenly). The padded rows are never returned, sampled or in the loss.
    pad_vocab_multiple: int = 1
    rope_theta: float = 10000.0  # RoPE base frequency (modern family)
    norm_eps: float = 1e-5  # LayerNorm / RMSNorm epsilon
    # The MLP's nonlinearity. None: the family's (gelu for gpt2, swiglu for modern). "gelu": GPT-2's
    # tanh GELU; "swiglu": silu(gate) * up (Shazeer 2020); "relu2": relu(x)^2 (So et al. 2021, Primer;
    # modded-nanogpt's MLP). gelu and relu2 use a 4*n_embd hidden layer, swiglu ~8/3*n_embd.
    mlp: str | None = None
    # RMSNorm (with a gain, over head_dim) on every head's queries and keys before RoPE and attention
    # (Dehghani et al. 2023, "Scaling Vision Transformers to 22B"; OLMo-2, modded-nanogpt).
    qk_norm: bool = False
    # Zero-initialise the residual branches' output projections (attention out-proj, MLP down-proj), so
    # that every block starts as the identity (modded-nanogpt; muP's zero init of residual branches).
    zero_init_proj: bool = False
    # Logits = cap * tanh(logits / cap) in every forward (loss, sampling, evaluation, ONNX); None: off.
    # Gemma 2 (Team et al. 2024) caps final logits at 30; modded-nanogpt used 30, then 15.
    logit_softcap: float | None = None
    # Attention does not cross <|endoftext|>: a token attends only to its own document inside a
    # training window (block-diagonal causal mask; see docs/model.md for the convention). Cached
    # decoding applies it too (model.gpt.cache_layout).
    doc_mask: bool = False
    # With doc_mask: positions (learned or RoPE) restart at 0 at each document's <|endoftext|>.
    doc_positions_restart: bool = False
    # The <|endoftext|> id that doc_mask splits documents at; None: the dataset's (training fills it
    # in from meta.json when doc_mask is on).
    eot_id: int | None = None
    # ---- Mixture of experts (model/moe.py; docs/model.md "Mixture of experts"). Off while n_experts is 0.
    # Routed experts per MoE block: each is a SwiGLU FFN; a token runs through moe_top_k of them,
    # token-choice and dropless (Shazeer et al. 2017; Fedus et al. 2022, Switch; Jiang et al. 2024, Mixtral: 8).
    n_experts: int = 0
    moe_top_k: int = 2  # experts per token (Mixtral 2 of 8; DeepSeek-V3 8 of 256; Qwen3-MoE 8 of 128)
    # Always-on shared experts beside the routed ones, one SwiGLU of n_shared_experts * expert width
    # (Dai et al. 2024, DeepSeekMoE; DeepSeek-V3: 1; Qwen2-MoE: 1 of 4x width). 0: none (Mixtral, Qwen3-MoE).
    n_shared_experts: int = 0
    # Which blocks are MoE: block i (0-based) is when i >= moe_first_dense and (i + 1) % moe_every == 0.
    # moe_every is Qwen2/3-MoE's decoder_sparse_step (1: every block; 2: every other, dense between);
    # moe_first_dense is DeepSeek-V3's first_k_dense_replace (its first 3 blocks are dense).
    moe_every: int = 1
    moe_first_dense: int = 0
    moe_hidden: int | None = None  # each expert's FFN width; None: the dense MLP's (hidden_dim)
    # "softmax": top-k of softmax(router logits) (Mixtral, Qwen3-MoE); "sigmoid": top-k of sigmoid
    # scores, the weights normalised over the chosen k (DeepSeek-V3, Liu et al. 2024, eq. 15-16).
    moe_router: str = "softmax"
    # Renormalise the chosen k weights to sum to 1 (Mixtral, DeepSeek-V3; Qwen3-MoE's norm_topk_prob).
    moe_norm_topk: bool = True
    moe_route_scale: float = 1.0  # multiplies the routed output (DeepSeek-V3's routed_scaling_factor 2.5)
    # Auxiliary balance loss E * sum_e f_e * P_e (Fedus et al. 2022, eq. 4): f_e the fraction of the
    # token-expert assignments that went to e, P_e the mean router probability; 1 at a uniform load.
    # Switch uses 0.01; DeepSeek-V3 relies on the bias update below with a tiny sequence-wise term.
    moe_aux_loss_coef: float = 0.01
    # Router z-loss mean(logsumexp(logits)^2) (Zoph et al. 2022, ST-MoE, eq. 5; they use 0.001). 0: off.
    moe_z_loss_coef: float = 0.0
    # Auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3 sec. 2.1.2): a per-expert bias added to
    # the scores for choosing experts only, moved by this rate towards balance after every optimizer step
    # (bias_e += rate * sign(mean load - load_e)); no gradient trains it. DeepSeek-V3: 0.001. 0: off.
    moe_bias_update_rate: float = 0.0
    # Expert compute: True a grouped matmul (torch's grouped_mm), False a loop over experts; None: grouped
    # on CUDA in bfloat16 (the kernel's inputs), the loop elsewhere. Both are the same function.
    moe_grouped_mm: bool | None = None
    extra: dict = field(default_factory=dict)  # reserved; keeps model.json forward compatible

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"model.family must be one of {', '.join(FAMILIES)}; got {self.family!r}")
        for name in ("block_size", "n_layer", "n_head", "n_embd", "pad_vocab_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1; got {getattr(self, name)}")
        for name in ("vocab_size", "n_kv_head", "ffn_hidden"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1 (or null); got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.dropout must be in [0, 1); got {self.dropout}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.mlp is None:
            self.mlp = "swiglu" if self.family == "modern" else "gelu"
        if self.mlp not in MLPS:
            raise ValueError(f"model.mlp must be one of {', '.join(MLPS)} (or null: the family's); got {self.mlp!r}")
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            raise ValueError(f"model.logit_softcap must be > 0 (or null: off); got {self.logit_softcap}")
        if self.doc_positions_restart and not self.doc_mask:
            raise ValueError("model.doc_positions_restart needs model.doc_mask: true")
        if self.eot_id is not None and not 0 <= self.eot_id < (self.vocab_size or self.eot_id + 1):
            raise ValueError(f"model.eot_id must be in [0, vocab_size) (or null: the dataset's); got {self.eot_id}")
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"model.n_head ({self.n_head}) must be a multiple of model.n_kv_head ({self.n_kv_head})")
        if self.family == "gpt2" and self.n_kv_head != self.n_head:
            raise ValueError("grouped-query attention (n_kv_head < n_head) needs model.family: modern")
        if self.family == "modern" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {self.head_dim}")
        self.check_moe()

    def check_moe(self) -> None:
        """One line per mixture-of-experts setting that cannot work."""
        if self.n_experts < 0:
            raise ValueError(f"model.n_experts must be >= 0 (0: dense); got {self.n_experts}")
        if not self.n_experts:
            return
        if not 1 <= self.moe_top_k <= self.n_experts:
            raise ValueError(f"model.moe_top_k must be in [1, n_experts={self.n_experts}]; got {self.moe_top_k}")
        if self.mlp != "swiglu":
            raise ValueError(f"MoE experts are SwiGLU FFNs; set model.mlp: swiglu (got {self.mlp})")
        if self.moe_router not in MOE_ROUTERS:
            raise ValueError(f"model.moe_router must be one of {', '.join(MOE_ROUTERS)}; got {self.moe_router!r}")
        for name in ("n_shared_experts", "moe_first_dense", "moe_aux_loss_coef", "moe_z_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name} must be >= 0; got {getattr(self, name)}")
        if self.moe_every < 1 or (self.moe_hidden is not None and self.moe_hidden < 1):
            raise ValueError("model.moe_every and model.moe_hidden must be >= 1")
        if not any(self.is_moe_layer(i) for i in range(self.n_layer)):
            raise ValueError(
                f"no block is MoE with moe_every={self.moe_every}, moe_first_dense={self.moe_first_dense} "
                f"and n_layer={self.n_layer}; lower them"
            )
        if not self.moe_bias_update_rate >= 0:
            raise ValueError(f"model.moe_bias_update_rate must be >= 0; got {self.moe_bias_update_rate}")

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block `layer` (0-based) has a mixture of experts in place of its MLP."""
        return self.n_experts > 0 and layer >= self.moe_first_dense and (layer + 1) % self.moe_every == 0

    @property
    def expert_hidden(self) -> int:
        """The FFN width of one expert (routed or shared)."""
        return self.moe_hidden or self.hidden_dim

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        if self.vocab_size is None:  # a bug in the caller: the training loop fills it in before building
            raise ValueError("ModelConfig.vocab_size is None; set it (the dataset's) before building the model")
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        if self.mlp != "swiglu":
            return 4 * self.n_embd
        # SwiGLU keeps the parameter count of a 4x MLP with 2/3 of the width (Shazeer 2020),
        # rounded up to a multiple of 64 for matmul efficiency (LLaMA uses multiple_of=256).
        return (int(8 * self.n_embd / 3) + 63) // 64 * 64

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {sorted(unknown)}; valid keys: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# GPT-2 sizes from Radford et al. 2019, Table 2 (vocab 50257, context 1024, tied
# embeddings, biases everywhere). Parameter counts are checked in tests/test_model.py.
PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124,439,808 params
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 354,823,168
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774,030,080
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1,557,611,200
    # The modern recipe at GPT-2-small scale: no biases, untied head, GQA 12:4.
    "modern-small": dict(
        family="modern", n_layer=12, n_head=12, n_kv_head=4, n_embd=768, bias=False, tie_embeddings=False
    ),
}

"""``ModelArgs``: the one description of a Llama-family model that every layer of onecard reads.

Built from a Hugging Face config.json; raises ``UnsupportedModelError`` for
architectures or options our own forward does not implement.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from onecard.errors import BadInputError, ModelFolderError, UnsupportedModelError

# HF architecture name -> our family tag. Everything here runs on our own forward.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
# config.json keys without a safe default: guessing any of them would build the wrong model.
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass(frozen=True)
class ModelArgs:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        sizes = {"vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                 "intermediate_size": self.intermediate_size, "num_layers": self.num_layers,
                 "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim}
        bad = [k for k, v in sizes.items() if not isinstance(v, int) or v <= 0]
        if bad:
            raise BadInputError(f"model config: {', '.join(bad)} must be positive integers, got "
                                f"{', '.join(str(sizes[k]) for k in bad)}")
        if self.num_heads % self.num_kv_heads:
            raise BadInputError(f"model config: {self.num_heads} attention heads are not a multiple of "
                                f"{self.num_kv_heads} key/value heads")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def fused_linear_shapes(self) -> list[tuple[int, int]]:
        """``(in, out)`` of one decoder layer's linears as onecard's model fuses them: qkv, o, gate/up, down."""
        return [(self.hidden_size, self.q_size + 2 * self.kv_size), (self.q_size, self.hidden_size),
                (self.hidden_size, 2 * self.intermediate_size), (self.intermediate_size, self.hidden_size)]

    @property
    def family(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    def num_parameters(self) -> int:
        """Exact parameter count of the HF model (norms, biases and embeddings included)."""
        h, i, L = self.hidden_size, self.intermediate_size, self.num_layers
        attn = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        if self.qkv_bias:
            attn += self.q_size + 2 * self.kv_size
        per_layer = attn + 3 * h * i + 2 * h
        emb = self.vocab_size * h
        return L * per_layer + emb + h + (0 if self.tie_word_embeddings else emb)

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedModelError(
                f"architecture {archs or cfg.get('model_type')} is not supported by onecard's engine; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        rope_scaling = cfg.get("rope_scaling")
        if rope_scaling:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if kind not in ("llama3", "linear", "yarn", "dynamic", "default"):
                raise UnsupportedModelError(
                    f"rope_scaling type '{kind}' is not supported; supported: llama3, linear, yarn, dynamic"
                )
        missing = [k for k in _REQUIRED if not isinstance(cfg.get(k), int) or cfg[k] <= 0]
        if missing:
            raise ModelFolderError(
                f"config.json lacks or has a bad {', '.join(repr(k) for k in missing)}; "
                "copy config.json from the original model"
            )
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        sliding = None
        if arch == "MistralForCausalLM":
            sliding = cfg.get("sliding_window")
        elif arch == "Qwen2ForCausalLM" and cfg.get("use_sliding_window"):
            raise UnsupportedModelError("Qwen2 with use_sliding_window=true is not supported; set it to false")
        max_positions = cfg.get("max_position_embeddings", 2048)
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) == "yarn":
            rope_scaling, max_positions = _yarn_context(dict(rope_scaling), max_positions)
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            max_position_embeddings=max_positions,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rope_scaling=dict(rope_scaling) if rope_scaling else None,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
            sliding_window=sliding,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            raw=cfg,
        )


def _yarn_context(scaling: dict, max_positions: int) -> tuple[dict, int]:
    """YaRN's (scaling with its original context and factor written out, the context it extends to).

    Qwen2.5's documented setting keeps ``max_position_embeddings`` at the trained 32k and adds ``factor`` 4:
    the usable context is 128k (as vLLM derives it). Configs that already state the extended length
    (DeepSeek's form: ``original_max_position_embeddings`` beside it, ``factor`` optional) keep it.
    """
    original = scaling.get("original_max_position_embeddings") or max_positions
    factor = scaling.get("factor") or max_positions / original
    scaling.update(original_max_position_embeddings=original, factor=factor)
    return scaling, max(max_positions, int(original * factor))

"""Architecture-independent facts about a loaded model, as the engine and server need them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from girandole.model.gemma3_vision import VisionConfig
    from girandole.model.spec import ArchSpec


@dataclass(frozen=True)
class EmbeddingModel:
    """A model trained to embed or to score text (engine/encoder.py, model/pooling_config.py):
    how its inputs are framed and its vectors pooled. Plain data: it travels to Ray replicas."""

    # "embed": a vector per input (BertModel, Qwen3-Embedding); "cross-encoder": a relevance
    # logit per (query, document) pair (BertForSequenceClassification); "yes-no": a decoder
    # answering whether a document meets the query (Qwen3-Reranker: api/rerank/yes_no.py)
    task: Literal["embed", "cross-encoder", "yes-no"]
    pooling: Literal["cls", "mean", "last"]
    normalize: bool  # sentence-transformers' Normalize module: unit vectors by default
    # the tokenizer's special tokens around one text ([CLS] ... [SEP]; Qwen3-Embedding's
    # trailing <|endoftext|>, whose state is its embedding), as its post-processor adds them
    prefix_ids: tuple[int, ...] = ()
    suffix_ids: tuple[int, ...] = ()
    generates: bool = True  # False: an encoder, embedding-only (completions and chat: 400)


@dataclass
class ModelConfig:
    architecture: str  # "gemma3", "llama", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gpt_oss"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int  # context window in tokens
    bos_token_id: int | None
    eos_token_ids: list[int]
    add_bos_token: bool = True
    name: str = ""
    # Sampling defaults from the checkpoint (HF generation_config.json); empty for GGUF.
    generation_config: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None
    # A vision model's image side (Gemma 3 4B and up); None: the model takes text only.
    vision: VisionConfig | None = None
    # Mixture-of-experts models: layers with a router and the experts each token runs there
    # (the shape of a token's routing matrix); 0 for dense models.
    num_moe_layers: int = 0
    moe_top_k: int = 0
    # A model served for embeddings or rerank scores; None: a plain LLM (mean pooling, rerank
    # by query likelihood)
    embedding: EmbeddingModel | None = None

    @classmethod
    def from_spec(
        cls,
        spec: ArchSpec,
        *,
        bos_token_id: int | None,
        eos_token_ids: list[int],
        add_bos_token: bool,
        name: str,
        generation_config: dict[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> ModelConfig:
        """The network's shape from `spec`; tokens, name and defaults from the checkpoint."""
        return cls(
            architecture=spec.architecture,
            vocab_size=spec.vocab_size,
            hidden_size=spec.hidden_size,
            num_layers=spec.num_layers,
            num_heads=spec.num_heads,
            num_kv_heads=spec.num_kv_heads,
            head_dim=spec.head_dim,
            max_position=spec.max_position,
            bos_token_id=bos_token_id,
            eos_token_ids=eos_token_ids,
            add_bos_token=add_bos_token,
            name=name,
            generation_config=generation_config or {},
            chat_template=chat_template,
            num_moe_layers=spec.num_moe_layers,
            moe_top_k=spec.num_experts_per_tok if spec.num_moe_layers else 0,
        )

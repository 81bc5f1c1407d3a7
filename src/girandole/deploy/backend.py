"""What the control plane asks of a backend: run N replicas of a deployment, say how they are,
and give the engines of the ready ones. The embedded backend (embedded.py) runs them as engines
of this process; a Ray Serve backend places them over a cluster."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from girandole.registry.deployments import Hardware


@dataclass(frozen=True)
class EngineOptions:
    """The server's engine flags, the same for every replica of every deployment (embedded or
    on Ray): what `girandole serve` was told beyond the model and its memory."""

    target_itl_ms: float | None = 100.0  # None: the token budget alone
    ngram_speculation_length: int = 0
    draft_model: str | None = None
    draft_token_count: int = 4
    max_loras: int = 8
    max_num_seqs: int = 64  # sequences running at once in one replica
    enforce_eager: bool = False  # no decode graphs (CUDA on GPU, recorded calls on CPU)
    threads: int | None = None  # CPU threads; None: auto (engine/cpu_threads.py)
    int8_prompts: bool = False  # prompt rows on the int8 kernel too (CPUs without AMX)
    overlap_scheduling: bool | None = None  # GPU: None = on; False: synchronous steps
    grammar_compile_timeout: float = 10.0  # seconds
    kv_cache_dtype: str = "auto"  # engine/kv_groups.py

    @classmethod
    def from_settings(cls, settings: Any) -> EngineOptions:
        itl = getattr(settings, "target_itl_ms", None)
        return cls(
            target_itl_ms=cls.target_itl_ms if itl is None else (itl or None),  # 0: off
            ngram_speculation_length=getattr(settings, "ngram_speculation_length", 0) or 0,
            draft_model=getattr(settings, "draft_model", None),
            draft_token_count=getattr(settings, "draft_token_count", None) or 4,
            max_loras=getattr(settings, "max_loras", None) or 8,
            max_num_seqs=getattr(settings, "max_num_seqs", None) or 64,
            enforce_eager=bool(getattr(settings, "enforce_eager", False)),
            threads=getattr(settings, "threads", None),
            int8_prompts=bool(getattr(settings, "int8_prompts", False)),
            overlap_scheduling=getattr(settings, "overlap_scheduling", None),
            grammar_compile_timeout=getattr(settings, "grammar_compile_timeout", None) or 10.0,
            kv_cache_dtype=getattr(settings, "kv_cache_dtype", None) or "auto",
        )


DEFAULT_ENGINE_OPTIONS = EngineOptions()


@dataclass(frozen=True)
class ReplicaSpec:
    """What every replica of a deployment runs; a changed spec restarts the replicas."""

    deployment: str  # accounts/<a>/deployments/<d>
    model: str | None  # a .gguf file, HF folder or repo id; None: the default model
    kv_cache_gb: float
    max_model_len: int | None  # None: the model's context
    merge_lora: str | None = None  # a PEFT LoRA folder merged into the weights at load
    options: EngineOptions = DEFAULT_ENGINE_OPTIONS

    def engine_config(self) -> Any:
        """The EngineConfig of one replica (imported here: the engine pulls in torch)."""
        from girandole.engine.engine import EngineConfig

        return EngineConfig(
            model=self.model,
            kv_cache_gb=self.kv_cache_gb,
            max_model_len=self.max_model_len,
            merge_lora=self.merge_lora,
            target_itl_ms=self.options.target_itl_ms,
            ngram_speculation_length=self.options.ngram_speculation_length,
            draft_model=self.options.draft_model,
            draft_token_count=self.options.draft_token_count,
            max_loras=self.options.max_loras,
            max_num_seqs=self.options.max_num_seqs,
            enforce_eager=self.options.enforce_eager,
            threads=self.options.threads,
            int8_prompts=self.options.int8_prompts,
            overlap_scheduling=self.options.overlap_scheduling,
            kv_cache_dtype=self.options.kv_cache_dtype,
        )

    def start_engine(self) -> Any:
        """A replica's engine, loaded (blocking: minutes for a large model): an AsyncEngine,
        or for an encoder (BERT, XLM-RoBERTa: embeddings and cross-encoder rerank) an
        EncoderEngine (engine/encoder.py)."""
        from girandole.engine.async_engine import AsyncEngine
        from girandole.engine.encoder import EncoderEngine, is_encoder_model
        from girandole.model.default import resolve_model_path

        config = self.engine_config()
        path = resolve_model_path(self.model)
        if is_encoder_model(path):
            return EncoderEngine(path, threads=self.options.threads)
        config.model = str(path)  # a repo id fetched once, here
        return AsyncEngine(config, grammar_compile_timeout=self.options.grammar_compile_timeout)


@dataclass
class ReplicaStats:
    pending_scheduling: int = 0
    downloading_model: int = 0
    initializing: int = 0
    ready: int = 0

    def to_json(self) -> dict[str, int]:
        return {
            "pendingSchedulingReplicaCount": self.pending_scheduling,
            "downloadingModelReplicaCount": self.downloading_model,
            "initializingReplicaCount": self.initializing,
            "readyReplicaCount": self.ready,
        }


# Called from the backend's threads when a replica becomes ready (error None) or fails to start.
ReplicaListener = Callable[[str, str | None], None]


class Backend(ABC):
    name: str  # for messages: "embedded"
    hardware: Hardware
    autoscales = False  # True: the backend scales by load itself (Ray Serve's autoscaler)

    @abstractmethod
    def check_replica_count(self, n: int, param: str) -> None:
        """Raise DeploymentError (400, saying why) when this backend cannot run n replicas."""

    @abstractmethod
    def scale(self, spec: ReplicaSpec, n: int, record: Any = None, *, manual: bool = True) -> None:
        """Move the deployment toward n replicas and return at once; replicas start and stop in
        the background. `record` (the DeploymentRecord) carries the replica range and
        autoscaling policy. `manual`: a `:scale` (an autoscaling backend holds n for a while);
        False: an update of the record, whose range and policy apply at once. Raises
        DeploymentError when they cannot start (memory)."""

    def wake(self, deployment: str) -> None:
        """A request found the deployment without a ready replica (an autoscaling backend
        starts one; the others are scaled by the manager)."""
        return None

    def keep_up(self, deployments: set[str]) -> None:
        """`deployments` have requests waiting for them in the server's admission queue now (the
        manager's holds), each second: an autoscaling backend must not take them for idle. The
        manager's own autoscaler reads the holds itself: nothing here."""
        return None

    def replace_stalled(self, limit_s: float) -> dict[str, str]:
        """Replace each ready replica whose engine loop died or has had work without finishing
        a step for `limit_s` (engine/protocol.py's stall_error); return {deployment: why} of
        those replaced. A backend whose platform health-checks replicas (Ray Serve) does it
        itself: nothing here."""
        return {}

    @abstractmethod
    def stats(self, deployment: str) -> ReplicaStats: ...

    def desired(self, deployment: str) -> int | None:
        """The replicas an autoscaling backend is moving toward now (None: the record's
        desiredReplicaCount is the answer)."""
        return None

    @abstractmethod
    def engines(self, deployment: str) -> list[Any]:
        """The engines of the deployment's ready replicas (AsyncEngine's interface)."""

    def all_engines(self, deployment: str) -> list[Any]:
        """Every engine of the deployment, ready or not: where an adapter unload must reach
        (the Ray backend's ingress engine keeps the deployment's adapters at zero replicas)."""
        return self.engines(deployment)

    @abstractmethod
    def idle_since(self, deployment: str) -> float | None:
        """When the deployment last served a request or became ready (None: no replica)."""

    @abstractmethod
    def touch(self, deployment: str) -> None:
        """A request went to the deployment (resets the scale-to-zero clock)."""

    @abstractmethod
    def shutdown(self) -> None: ...

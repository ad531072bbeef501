"""Model × GPU presets and the arithmetic that turns them into a KV-cache block count.

bytes per block = 2 (K and V) × layers × KV heads × head dim × dtype bytes × block size
KV budget       = GPU memory × memory utilization − weight bytes − runtime overhead
blocks          = floor(KV budget / bytes per block)

The default, Llama 2 13B on an A100 40GB, gives 13,107,200 bytes per block and 924 blocks.
A preset is named ``MODEL@GPU`` (``llama-3.1-8b@h100-80gb``); a bare model name means that
model on the default GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kvqueue.errors import ConfigError
from kvqueue.gpu.hashing import BLOCK_SIZE

GIB = 1 << 30


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int
    num_params: int
    max_context_tokens: int

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes


@dataclass(frozen=True, slots=True)
class GpuSpec:
    name: str
    memory_bytes: int


MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec("llama-2-13b", 40, 40, 128, 2, 13_015_864_320, 4_096),
        ModelSpec("llama-2-7b", 32, 32, 128, 2, 6_738_415_616, 4_096),
        ModelSpec("llama-3.1-8b", 32, 8, 128, 2, 8_030_261_248, 131_072),
        ModelSpec("mistral-7b", 32, 8, 128, 2, 7_241_732_096, 32_768),
        ModelSpec("qwen2.5-7b", 28, 4, 128, 2, 7_615_616_512, 131_072),
        ModelSpec("qwen2.5-7b-1m", 28, 4, 128, 2, 7_615_616_512, 1_010_000),
    )
}

GPUS: dict[str, GpuSpec] = {
    g.name: g
    for g in (
        GpuSpec("a100-40gb", 40 * GIB),
        GpuSpec("a100-80gb", 80 * GIB),
        GpuSpec("h100-80gb", 80 * GIB),
        GpuSpec("l40s-48gb", 48 * GIB),
        GpuSpec("h200-141gb", 141 * GIB),
    )
}

DEFAULT_MODEL = "llama-2-13b"
DEFAULT_GPU = "a100-40gb"
DEFAULT_PRESET = f"{DEFAULT_MODEL}@{DEFAULT_GPU}"
GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default share of GPU memory the engine may use
RUNTIME_OVERHEAD_BYTES = 500_000_000  # activations, CUDA graphs and allocator slack


@dataclass(frozen=True, slots=True)
class Preset:
    """A simulated GPU: one model on one GPU, with its KV-cache capacity.

    `num_blocks` is derived from the memory figures unless `num_blocks_override` is set;
    `max_context_tokens` defaults to the model's.
    """

    model: ModelSpec
    gpu: GpuSpec
    block_size: int = BLOCK_SIZE
    memory_utilization: float = GPU_MEMORY_UTILIZATION
    overhead_bytes: int = RUNTIME_OVERHEAD_BYTES
    num_blocks_override: int | None = None
    max_context_override: int | None = None

    @property
    def name(self) -> str:
        return f"{self.model.name}@{self.gpu.name}"

    @property
    def bytes_per_block(self) -> int:
        m = self.model
        return 2 * m.num_layers * m.num_kv_heads * m.head_dim * m.dtype_bytes * self.block_size

    @property
    def kv_budget_bytes(self) -> int:
        usable = int(self.gpu.memory_bytes * self.memory_utilization)
        return usable - self.model.weight_bytes - self.overhead_bytes

    @property
    def derived_num_blocks(self) -> int:
        return max(0, self.kv_budget_bytes // self.bytes_per_block)

    @property
    def num_blocks(self) -> int:
        if self.num_blocks_override is not None:
            return self.num_blocks_override
        return self.derived_num_blocks

    @property
    def max_context_tokens(self) -> int:
        if self.max_context_override is not None:
            return self.max_context_override
        return self.model.max_context_tokens

    @property
    def kv_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def arithmetic(self) -> str:
        """The derivation of the block count, spelled out."""
        m = self.model
        usable = int(self.gpu.memory_bytes * self.memory_utilization)
        lines = [
            f"bytes/block = 2 × {m.num_layers} layers × {m.num_kv_heads} KV heads × "
            f"{m.head_dim} dim × {m.dtype_bytes} B × {self.block_size} tokens "
            f"= {self.bytes_per_block:,} B",
            f"KV budget   = {self.gpu.memory_bytes:,} B × {self.memory_utilization} "
            f"− {m.weight_bytes:,} B weights − {self.overhead_bytes:,} B overhead "
            f"= {usable - m.weight_bytes - self.overhead_bytes:,} B "
            f"({self.kv_budget_bytes / GIB:.2f} GiB)",
            f"blocks      = floor({self.kv_budget_bytes:,} / {self.bytes_per_block:,}) "
            f"= {self.derived_num_blocks:,}",
        ]
        if self.num_blocks_override is not None:
            lines.append(f"blocks      = {self.num_blocks:,} (override)")
        return "\n".join(lines)

    def with_overrides(
        self, num_blocks: int | None = None, max_context_tokens: int | None = None
    ) -> Preset:
        if num_blocks is not None and num_blocks <= 0:
            raise ConfigError(f"num_blocks must be positive, got {num_blocks}")
        if max_context_tokens is not None and max_context_tokens <= 0:
            raise ConfigError(f"max_context_tokens must be positive, got {max_context_tokens}")
        return replace(
            self,
            num_blocks_override=num_blocks if num_blocks is not None else self.num_blocks_override,
            max_context_override=(
                max_context_tokens if max_context_tokens is not None else self.max_context_override
            ),
        )


def get_preset(
    name: str = DEFAULT_PRESET,
    num_blocks: int | None = None,
    max_context_tokens: int | None = None,
) -> Preset:
    """Look up ``MODEL@GPU`` (a bare model means the default GPU); unknown names list valid ones."""
    model_name, _, gpu_name = name.partition("@")
    gpu_name = gpu_name or DEFAULT_GPU
    if model_name not in MODELS:
        raise ConfigError(
            f"unknown model {model_name!r} in preset {name!r}; valid: {sorted(MODELS)}"
        )
    if gpu_name not in GPUS:
        raise ConfigError(f"unknown GPU {gpu_name!r} in preset {name!r}; valid: {sorted(GPUS)}")
    preset = Preset(MODELS[model_name], GPUS[gpu_name])
    if preset.derived_num_blocks <= 0 and num_blocks is None:
        raise ConfigError(
            f"preset {name!r}: {preset.model.weight_bytes:,} B of weights leave no room for KV "
            f"cache on {preset.gpu.memory_bytes:,} B"
        )
    return preset.with_overrides(num_blocks, max_context_tokens)


def all_presets() -> list[Preset]:
    """Every model × GPU pair whose weights leave room for a KV cache."""
    presets = [Preset(m, g) for m in MODELS.values() for g in GPUS.values()]
    return [p for p in presets if p.derived_num_blocks > 0]

"""The accelerator this process's replicas run on, as Fireworks' acceleratorType names it."""

from __future__ import annotations

from girandole.registry.deployments import Hardware

# Fireworks' acceleratorType values: <vendor>_<model>_<memory>GB.
ACCELERATOR_TYPES = (
    "NVIDIA_A100_80GB",
    "NVIDIA_H100_80GB",
    "NVIDIA_H200_141GB",
    "NVIDIA_B200_180GB",
    "NVIDIA_B300_288GB",
    "NVIDIA_A10G_24GB",
    "NVIDIA_L4_24GB",
    "NVIDIA_A100_40GB",
    "AMD_MI300X_192GB",
    "AMD_MI325X_256GB",
    "AMD_MI350X_288GB",
)


def accelerator_type_of(device_name: str, memory_bytes: int) -> str | None:
    """The acceleratorType of a GPU from its name and memory (A100 40 vs 80 GB by memory)."""
    name = device_name.upper().replace("-", " ")
    best: tuple[float, str] | None = None
    for value in ACCELERATOR_TYPES:
        _, model, memory = value.split("_")
        if model not in name.split() and f" {model}" not in f" {name}":
            continue
        gap = abs(int(memory[:-2]) * 1e9 - memory_bytes)
        if best is None or gap < best[0]:
            best = (gap, value)
    return best[1] if best else None


def detect_hardware() -> Hardware:
    import torch

    if not torch.cuda.is_available():
        return Hardware(None, 0, "CPU only, no accelerator")
    props = torch.cuda.get_device_properties(0)
    return Hardware(
        accelerator_type_of(props.name, props.total_memory),
        1,
        f"one {props.name} per replica",
    )

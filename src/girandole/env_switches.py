"""On/off environment variables, read as the `girandole serve` switches' variables are.

A switch takes 1/true/yes/on or 0/false/no/off (any case; blank or unset: its default), and
any other word is a ValueError naming the variable. The engine's own switches
(GIRANDOLE_NATIVE_KERNELS, GIRANDOLE_AMX, GIRANDOLE_VNNI, GIRANDOLE_FUSED_LAYERS,
GIRANDOLE_KV_HUGE_PAGES; on by default) were once off only for the exact text `0`:
`GIRANDOLE_AMX=false` silently kept AMX on. `girandole serve` checks them at start-up (one
line, exit 2); the kernels and the KV cache read them at use.
"""

from __future__ import annotations

import os

ENV_PREFIX = "GIRANDOLE_"
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
# The engine's switches, on unless their variable says off (README, "Settings")
ENGINE_SWITCHES = ("NATIVE_KERNELS", "AMX", "VNNI", "FUSED_LAYERS", "KV_HUGE_PAGES")


def switch_word(text: str, name: str) -> bool:
    """`text` read as a yes/no word, else a ValueError naming GIRANDOLE_<name>."""
    word = text.strip().lower()
    if word not in TRUE_WORDS + FALSE_WORDS:
        raise ValueError(
            f"{ENV_PREFIX}{name} must be one of {', '.join(TRUE_WORDS + FALSE_WORDS)}, not {text!r}"
        )
    return word in TRUE_WORDS


def env_switch(name: str, default: bool = True) -> bool:
    """GIRANDOLE_<name> as a switch; `default` where it is unset or blank."""
    value = os.environ.get(ENV_PREFIX + name, "")
    return switch_word(value, name) if value.strip() else default


NATIVE_ISAS = ("avx512", "avx2")  # the native kernels' builds (model/kernels/loader.py)


def native_isa_setting() -> str | None:
    """GIRANDOLE_NATIVE_ISA: the native kernels' build asked for (`avx2` on an AVX512 CPU, to
    test that build there), None where unset or blank; any other word is a ValueError naming
    the variable."""
    value = os.environ.get(ENV_PREFIX + "NATIVE_ISA", "").strip().lower()
    if value and value not in NATIVE_ISAS:
        raise ValueError(
            f"{ENV_PREFIX}NATIVE_ISA must be one of {', '.join(NATIVE_ISAS)}, not {value!r}"
        )
    return value or None


def check_engine_switches() -> None:
    """Raise the ValueError of the first engine switch whose variable is no yes/no word (or
    of GIRANDOLE_NATIVE_ISA where it names no build)."""
    for name in ENGINE_SWITCHES:
        env_switch(name)
    native_isa_setting()


def threads_setting(value: str | int | None) -> int | None:
    """A CPU thread count from `--threads` or GIRANDOLE_THREADS: a whole number >= 1, or None
    for "auto" (also blank or unset: the engine follows the cores other work leaves it,
    engine/cpu_threads.py); anything else is a ValueError naming the variable."""
    if value is None or isinstance(value, int):
        if value is not None and value < 1:
            raise ValueError(f"threads must be a whole number >= 1 or auto, not {value}")
        return value
    text = value.strip().lower()
    if text in ("", "auto"):
        return None
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise ValueError(f"{ENV_PREFIX}THREADS must be a whole number >= 1 or auto, not {value!r}")


def env_threads() -> int | None:
    """GIRANDOLE_THREADS read by threads_setting."""
    return threads_setting(os.environ.get(ENV_PREFIX + "THREADS"))

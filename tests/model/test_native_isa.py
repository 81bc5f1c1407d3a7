"""The native kernels' two builds (model/kernels/loader.py): AVX512 where the CPU has
AVX512-BF16 and VNNI, else AVX2 + FMA + F16C, the same sources with each 512-bit operation as
two 256-bit ones (csrc/avx2_compat.h). On an AVX2-only host the kernel tests run that build
themselves; on an AVX512 host this file runs them again against the AVX2 build
(GIRANDOLE_NATIVE_ISA=avx2), so both builds are checked wherever the suite runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from girandole.model.kernels import loader

ROOT = Path(__file__).resolve().parents[2]
KERNEL_TESTS = [
    "tests/model/test_wq_gemm.py",
    "tests/model/test_int4_head.py",
    "tests/model/test_int8_gemm.py",
    "tests/model/test_paged_attention.py",
    "tests/model/test_rms_norm.py",
    "tests/model/test_gated_act.py",
]


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )


def test_the_build_follows_the_cpu():
    flags = loader.cpu_flags()
    if all(f in flags for f in loader.ISA_CPU_FLAGS["avx512"]):
        expected = "avx512"
    elif all(f in flags for f in loader.ISA_CPU_FLAGS["avx2"]):
        expected = "avx2"
    else:
        expected = None
    assert loader.isa() == expected
    if expected is not None and loader.library() is not None:
        assert f"girandole-native-{expected}-" in loader.library()._name


def test_a_bad_isa_word_is_an_error_naming_the_variable():
    code = "from girandole.model.kernels import loader; loader.isa()"
    done = _run(["-c", code], GIRANDOLE_NATIVE_ISA="sse4")
    assert done.returncode != 0
    assert "GIRANDOLE_NATIVE_ISA must be one of avx512, avx2, not 'sse4'" in done.stderr
    from girandole.env_switches import check_engine_switches

    os.environ["GIRANDOLE_NATIVE_ISA"] = "neon"
    try:
        with pytest.raises(ValueError, match="GIRANDOLE_NATIVE_ISA"):
            check_engine_switches()
    finally:
        del os.environ["GIRANDOLE_NATIVE_ISA"]


def test_an_isa_the_cpu_lacks_leaves_torch_kernels():
    """Asking for the AVX512 build on a CPU without AVX512 is no crash: no native kernels."""
    if loader.isa() == "avx512":
        pytest.skip("this CPU has AVX512")
    code = "from girandole.model.kernels import loader; print(loader.isa(), loader.library())"
    done = _run(["-c", code], GIRANDOLE_NATIVE_ISA="avx512")
    assert done.stdout.split() == ["None", "None"], done.stderr


@pytest.mark.skipif(
    loader.isa() != "avx512"
    or not all(f in loader.cpu_flags() for f in loader.ISA_CPU_FLAGS["avx2"]),
    reason="needs an AVX512 CPU (on an AVX2-only one the kernel tests run the AVX2 build)",
)
def test_the_kernel_tests_pass_on_the_avx2_build():
    code = "from girandole.model.kernels import loader; print(loader.isa(), loader.amx())"
    done = _run(["-c", code], GIRANDOLE_NATIVE_ISA="avx2")
    assert done.stdout.split() == ["avx2", "False"], done.stderr
    done = _run(
        ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not amx", *KERNEL_TESTS],
        GIRANDOLE_NATIVE_ISA="avx2",
        PYTEST_ADDOPTS="",
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " failed" not in done.stdout


@pytest.mark.skipif(loader.isa() is None, reason="no native build for this CPU")
def test_a_build_from_nothing_leaves_only_the_library(tmp_path):
    """The sources compile side by side into objects in a temporary folder, then link: the
    cache folder is left with the library alone, and the library serves."""
    code = (
        "from girandole.model.kernels import loader; lib = loader.library();"
        " print(lib is not None and hasattr(lib, 'paged_attention'))"
    )
    done = _run(["-c", code], GIRANDOLE_CACHE_DIR=str(tmp_path))
    assert done.stdout.split() == ["True"], done.stderr[-2000:]
    built = [p.name for p in (tmp_path / "kernels").iterdir()]
    assert len(built) == 1 and built[0].startswith(f"girandole-native-{loader.isa()}-"), built
    assert built[0].endswith(".so")

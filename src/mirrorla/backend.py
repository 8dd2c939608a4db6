"""Kernels and the one place that decides which implementation runs an op (the layer below :mod:`mirrorla.ops`).

Implementations: ``torch`` (the pure-PyTorch reference in :mod:`mirrorla.ops`), ``cpu`` (the fused C++ kernels
of ``ops/csrc/mirror_cpu.cpp``; MirrorLA's rotation and ReLU and the token sums also backward) and ``triton``
(``ops/triton_linear_attention.py``, fused GPU kernels, forward and backward). ``MIRRORLA_BACKEND=auto|torch|cpu|
triton`` forces a choice (default ``auto``):

- ``auto``: CUDA tensors take ``triton`` where Triton is installed; CPU tensors take ``cpu`` where the kernels
  built and either no gradient is needed or the kernel has a backward; everything else takes ``torch``.
- ``triton`` on CPU tensors runs the kernels in Triton's interpreter when ``TRITON_INTERPRET=1`` (how the tests
  check them without a GPU); without it, CPU tensors fall back to ``torch``.
- ``torch``: always the reference. ``cpu``: the C++ kernels wherever they apply.

The C++ kernels are compiled on first use with :func:`torch.utils.cpp_extension.load` (a C++ compiler and ninja
are needed; the build is cached per machine under ``TORCH_EXTENSIONS_DIR``, ~12 s once).
``MIRRORLA_CPU_KERNELS=0`` always uses the reference; ``=1`` makes a failed build an error.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import threading
import warnings
from pathlib import Path

import torch

__all__ = [
    "BACKENDS",
    "DELTA_FORM_CODES",
    "backend_setting",
    "cpu_kernels_available",
    "cpu_kernels_status",
    "select_backend",
    "triton_available",
    "triton_interpreter_problem",
]

BACKENDS = ("auto", "torch", "cpu", "triton")

DELTA_FORM_CODES = {"tanh_log": 0, "log": 1, "rsqrt": 2}
"""The kernels' integer code of each Δα form (the keys of :data:`mirrorla.ops.DELTA_FORMS`): the one definition,
handed to the C++ build as macros and read by the Triton kernels."""

def backend_setting() -> str:
    """The value of ``MIRRORLA_BACKEND`` (``auto`` when unset); an unknown value is an error that names it."""
    value = os.environ.get("MIRRORLA_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"MIRRORLA_BACKEND must be one of {', '.join(BACKENDS)}, got {value!r}")
    return value


# Looked up once, at import: importlib's find_spec is one of the functions torch.compile refuses to trace, and
# select_backend runs inside compiled models (a lazy lookup there broke the first compiled forward).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _triton_installed() -> bool:
    return _TRITON_INSTALLED


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as ``3.6.0`` or ``2.4.0rc1``."""
    major, minor = ([int("".join(ch for ch in part if ch.isdigit()) or 0) for part in version.split(".")[:2]]
                    + [0, 0])[:2]
    return major, minor


def _interpreter_problem(triton_version: str | None, numpy_version: str | None) -> str | None:
    """Why Triton's interpreter cannot run the kernels with these versions, or None.

    Triton before 3.7 turns a loop bound passed as an argument (``range(0, TILES)``) into an int by converting a
    one-element array, which NumPy 2.4 made an error (deprecated since 1.25): every kernel with such a loop fails
    with "only 0-dimensional arrays can be converted to Python scalars". Triton 3.7 squeezes the array first."""
    if triton_version is None or numpy_version is None:
        return None
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter (TRITON_INTERPRET=1) cannot run the kernels with "
                f"NumPy {numpy_version}: install numpy<2.4 or triton>=3.7 (compiled kernels on a GPU are not "
                "affected)")
    return None


def _installed_version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


# read from the packages' metadata at import, for the reason of _TRITON_INSTALLED (triton itself is not imported)
_INTERPRETER_PROBLEM = _interpreter_problem(_installed_version("triton"), _installed_version("numpy"))


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device``. CPU tensors need ``TRITON_INTERPRET=1``; an
    interpreter that cannot run them with the installed NumPy is an error that says what to install."""
    if device.type == "cuda":
        return _triton_installed()
    if device.type != "cpu" or os.environ.get("TRITON_INTERPRET", "0") != "1" or not _triton_installed():
        return False
    if _INTERPRETER_PROBLEM is not None:
        raise RuntimeError(f"mirrorla: {_INTERPRETER_PROBLEM}")
    return True


def triton_interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run the kernels with the installed Triton and NumPy (one line), or None."""
    return _INTERPRETER_PROBLEM


def select_backend(*tensors: torch.Tensor, has_triton: bool = True, has_cpu: bool = False,
                   cpu_backward: bool = False) -> str:
    """``"torch"``, ``"cpu"`` or ``"triton"`` for an op on ``tensors``.

    ``has_triton``/``has_cpu``: whether the op has that kernel; ``cpu_backward``: whether its C++ kernel also has
    a backward (else a call that wants a gradient takes ``torch``). A forced backend the op or the device cannot
    use falls back to ``torch``.
    """
    setting = backend_setting()
    device = tensors[0].device
    if setting == "torch":
        return "torch"
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    # auto takes Triton on CUDA only; CPU tensors (the interpreter) need it asked for
    if has_triton and (setting == "triton" or (setting == "auto" and device.type == "cuda")):
        if triton_available(device) and all(t.dtype in (torch.float32, torch.float16, torch.bfloat16)
                                            for t in tensors):
            return "triton"
    if has_cpu and setting in ("auto", "cpu") and device.type == "cpu" and (cpu_backward or not wants_grad):
        return "cpu"
    return "torch"


# ------------------------------------------------------------------------------------------- the C++ kernels


_SOURCE = Path(__file__).with_name("ops") / "csrc" / "mirror_cpu.cpp"
_lock = threading.Lock()
_state: dict[str, object] = {"tried": False, "ok": False, "error": None}


def _cpu_flags() -> str:
    """The CPU's instruction-set flags: the build uses -march=native, so a cache shared by different machines
    (a cluster's home directory) must not hand one CPU's binary to another."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _build() -> None:
    # torch logs a CUDA_HOME note when cpp_extension is imported on a machine without CUDA; noise here
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        _load_extension()
    finally:
        log.setLevel(level)


def _load_extension() -> None:
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:
        try:  # the pip package puts the binary next to itself, not always on PATH (an unactivated venv)
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    # the name keys the build cache: a new source, CPU or torch (whose ABI the binary links against) rebuilds
    key = _SOURCE.read_bytes() + torch.__version__.encode() + _cpu_flags().encode() + str(DELTA_FORM_CODES).encode()
    tag = hashlib.sha1(key).hexdigest()[:12]
    cpp_extension.load(
        name=f"mirrorla_cpu_{tag}",
        sources=[str(_SOURCE)],
        extra_cflags=["-O3", "-march=native", "-fopenmp",
                      *(f"-DMIRRORLA_DELTA_{name.upper()}={code}" for name, code in DELTA_FORM_CODES.items())],
        extra_ldflags=["-fopenmp"],  # at::parallel_for is an OpenMP pragma in a header: without it, one thread
        is_python_module=False,
        verbose=False,
    )


def cpu_kernels_available() -> bool:
    """Whether the fused CPU kernels are built and loaded (builds them on the first call)."""
    if _state["tried"]:
        return bool(_state["ok"])
    with _lock:
        if _state["tried"]:
            return bool(_state["ok"])
        setting = os.environ.get("MIRRORLA_CPU_KERNELS", "").strip()
        if setting == "0":
            _state.update(tried=True, ok=False, error="disabled by MIRRORLA_CPU_KERNELS=0")
            return False
        try:
            _build()
            _state.update(tried=True, ok=True, error=None)
        except Exception as err:  # noqa: BLE001 (no compiler, no ninja, a failed build: all mean "use the reference")
            _state.update(tried=True, ok=False, error=f"{type(err).__name__}: {str(err).strip()[-500:]}")
            if setting == "1":
                raise RuntimeError(
                    f"MIRRORLA_CPU_KERNELS=1 but the CPU kernels failed to build: {_state['error']}") from err
            warnings.warn(
                "mirrorla: the fused CPU kernels could not be built; the MirrorLA map runs as plain PyTorch ops "
                f"(same values, slower). Reason: {_state['error']}",
                RuntimeWarning,
                stacklevel=3,
            )
    return bool(_state["ok"])


def cpu_kernels_status() -> str:
    """``"built"``, or why the reference runs instead (builds the kernels if not tried yet)."""
    return "built" if cpu_kernels_available() else f"unavailable ({_state['error']})"

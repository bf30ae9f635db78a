"""Native CPU kernels (``csrc/moefx_cpu.c``), compiled with the system C compiler on first use.

PyTorch covers every op moefx needs except one that matters for speed: the exact GELU of
SliceMoE's experts, whose hidden activations are eight times the dense FFN's, so that ATen's
exp-based erf costs ~15 ms of a ~90 ms layer call at T=2048 (bench/results-layers.md). The C
kernel evaluates erf as a rational function (no exp) that the compiler vectorises.

How it is built and used:

- Linux only, float32 CPU tensors, when a C compiler is found (``$CC``, else ``cc``/``gcc``/
  ``clang``). The shared library is cached under ``$MOEFX_CACHE_DIR`` (default
  ``~/.cache/moefx``), keyed by the source, the compiler, its flags and the CPU's feature flags
  (it is built with ``-march=native``), and written atomically (temporary file, then rename),
  so that concurrent processes and interrupted builds are harmless. A build takes well under a
  second.
- Threads: compiled with OpenMP, it binds to the OpenMP runtime PyTorch already loaded (Linux
  wheels ship ``libgomp.so.1``; the dynamic linker reuses a loaded library of that name), so it
  shares PyTorch's thread team and honours ``torch.set_num_threads``. If the process then holds
  two OpenMP runtimes (a PyTorch built against another one), the kernel runs single-threaded.
- ``MOEFX_NATIVE=0`` turns it off (ATen's GELU everywhere). Any build or load failure does the
  same, once, logged at INFO on the ``moefx`` logger: native kernels are an optimisation, never
  a requirement.

Numerics: ``|erf error| <= 4e-7`` in float32 (ATen's own formula: ~1.5e-7 plus rounding); tests
check the kernel against the float64 reference of SPEC.md §3 like every other path.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger("moefx")

SOURCE = Path(__file__).with_name("csrc") / "moefx_cpu.c"
FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fPIC", "-shared"]
OPENMP_FLAG = "-fopenmp"

MIN_NUMEL = 4096
"""Smaller tensors keep ATen's GELU: the ctypes call costs about as much as it saves."""

_lock = threading.Lock()
_state: dict = {}


def enabled() -> bool:
    return os.environ.get("MOEFX_NATIVE", "1") != "0" and sys.platform.startswith("linux")


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.strip()
    except OSError:
        pass
    return platform.processor()


def cache_dir() -> Path:
    root = os.environ.get("MOEFX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moefx")
    return Path(root) / "native"


def _build(cc: str, openmp: bool) -> Path:
    source = SOURCE.read_bytes()
    flags = FLAGS + ([OPENMP_FLAG] if openmp else [])
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join(
        [source, cc.encode(), version.encode(), " ".join(flags).encode(), platform.machine().encode(),
         _cpu_flags().encode()])).hexdigest()[:16]
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        directory = Path(tempfile.gettempdir()) / f"moefx-native-{os.getuid()}"
        directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"moefx_cpu-{key}{'-omp' if openmp else ''}.so"
    if target.exists():
        return target
    fd, tmp = tempfile.mkstemp(prefix=".moefx_cpu-", suffix=".so", dir=directory)
    os.close(fd)
    try:
        result = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{cc} failed: {result.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _openmp_runtimes() -> set:
    """Distinct OpenMP runtime files mapped into this process (Linux)."""
    names = ("libgomp", "libiomp", "libomp")
    try:
        with open("/proc/self/maps") as f:
            return {line.split()[-1] for line in f if any(n in line.rsplit("/", 1)[-1] for n in names)}
    except OSError:
        return set()


def _load():
    """The loaded library with its prototypes set, or None (and why, logged once)."""
    if "lib" in _state:
        return _state["lib"]
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        lib, threaded, why = None, False, ""
        try:
            cc = _compiler()
            if cc is None:
                raise RuntimeError("no C compiler found (set $CC)")
            before = _openmp_runtimes()
            try:
                path = _build(cc, openmp=True)
            except RuntimeError:
                path = _build(cc, openmp=False)  # a compiler without OpenMP: one thread
            lib = ctypes.CDLL(str(path))
            lib.moefx_gelu_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
            lib.moefx_gelu_f32.restype = None
            lib.moefx_has_openmp.restype = ctypes.c_int
            after = _openmp_runtimes()
            # threaded only when the library shares PyTorch's runtime (no second one appeared)
            threaded = bool(lib.moefx_has_openmp()) and len(after) <= max(1, len(before))
            why = f"using {path} ({'threaded' if threaded else 'single-threaded'})"
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            lib, why = None, f"unavailable ({exc}); using PyTorch's GELU"
        log.info("moefx native CPU kernels: %s", why)
        _state.update(lib=lib, threaded=threaded, why=why)
        return lib


def status() -> str:
    """One line: whether the native kernels are in use, and why not if they are not."""
    if not enabled():
        return "off (MOEFX_NATIVE=0 or not Linux)"
    _load()
    return _state["why"]


def _plain(z: torch.Tensor) -> bool:
    return (
        type(z) is torch.Tensor
        and z.dtype == torch.float32
        and z.device.type == "cpu"
        and z.layout == torch.strided
        and z.is_contiguous()
        and z.numel() >= MIN_NUMEL
        and not (z.requires_grad and torch.is_grad_enabled())
        and not torch._C._functorch.is_functorch_wrapped_tensor(z)
    )


def gelu_(z: torch.Tensor) -> bool:
    """Exact GELU of ``z`` in place with the native kernel; False (``z`` untouched) where it
    does not apply: not a plain contiguous float32 CPU tensor of at least :data:`MIN_NUMEL`
    values outside autograd, native kernels off or unavailable."""
    if not (enabled() and _plain(z)):
        return False
    lib = _load()
    if lib is None:
        return False
    threads = torch.get_num_threads() if _state["threaded"] else 1
    lib.moefx_gelu_f32(z.data_ptr(), z.numel(), threads)
    return True

"""Native CPU kernels (``csrc/moefx_cpu.c``), compiled with the system C compiler on first use.

PyTorch covers every op moefx needs, but two things matter for speed on the CPU and PyTorch
cannot fuse them:

- :func:`gelu_`: the exact GELU, with erf as a rational function (no exp) that the compiler
  vectorises (~1.4x ATen's throughput).
- :func:`expert_mlp`: the grouped expert MLP of ``moefx::moe_ffn`` in one call: gather, GEMM1,
  activation (any of moefx's), GLU, GEMM2 and the routing weight per block of an expert's rows,
  the hidden activations staying in cache. SliceMoE's experts have eight times the hidden
  activations of the dense FFN; through separate PyTorch ops they travel to memory and back
  (~100 MB per layer call at T=2048), which made SliceMoE 1.4x the dense FFN's time; fused it
  is below the dense FFN (bench/results-layers.md).

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

ACTIVATIONS = {"identity": 0, "relu": 1, "gelu": 2, "silu": 3, "quick_gelu": 4, "gelu_tanh": 5, "relu2": 6}
"""moefx's activation names and their codes in ``moefx_expert_mlp_f32``."""

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
            ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
            lib.moefx_expert_mlp_f32.argtypes = [ptr, i64, ptr, ptr, i64, ptr, i32, ptr, ptr, ptr, ptr, ptr,
                                                 ptr, i64, i64, i32, ptr, i32]
            lib.moefx_expert_mlp_f32.restype = ctypes.c_int
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


def _plain_f32(t: torch.Tensor) -> bool:
    """A float32 CPU tensor whose memory the C code may read directly: plain (a Parameter
    too), strided, not a functorch wrapper or a tensor subclass."""
    return (
        type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.dtype == torch.float32
        and t.device.type == "cpu"
        and t.layout == torch.strided
        and not torch._C._functorch.is_functorch_wrapped_tensor(t)
    )


def _plain(z: torch.Tensor) -> bool:
    return (
        type(z) is torch.Tensor
        and _plain_f32(z)
        and z.is_contiguous()
        and z.numel() >= MIN_NUMEL
        and not (z.requires_grad and torch.is_grad_enabled())
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


def _readable(t: Optional[torch.Tensor]) -> bool:
    return t is None or (_plain_f32(t) and t.is_contiguous())


def expert_mlp(x: torch.Tensor, rows: torch.Tensor, counts: list, gate: Optional[torch.Tensor],
               gate_input: bool, w1: torch.Tensor, b1: Optional[torch.Tensor], w3: Optional[torch.Tensor],
               b3: Optional[torch.Tensor], w2: torch.Tensor, b2: Optional[torch.Tensor],
               activation: str) -> Optional[torch.Tensor]:
    """The grouped expert MLP in one native call, or None where it does not apply (then
    nothing was computed).

    ``rows [M]``: the x row of each (row, slot) pair, grouped by expert; ``counts``: pairs per
    expert (host ints, summing to M); ``gate [M]``: each pair's routing weight, or None for
    all-ones weights; ``gate_input``: the weight scales the input row (else the output row,
    bias included). Weights in moefx's layout: ``w1/w3 [E, h, d]``, ``w2 [E, d, h]``. Returns
    ``[M + 1, d]``: the pair outputs in grouped order, then a zero row (the slot that
    :func:`moefx.kernels.cpu._combine_slots` gives unused pairs).

    Applies to float32 CPU tensors outside any tracer (the caller is an op's CPU kernel or a
    plain inference forward; nothing here records autograd, so it must not be reached with
    inputs that need gradients through it), any moefx activation, with or without GLU."""
    if not (enabled() and activation in ACTIVATIONS and x.dim() == 2 and x.stride(1) == 1 and _plain_f32(x)):
        return None
    if not all(_readable(t) for t in (w1, b1, w3, b3, w2, b2, gate)):
        return None
    if rows.dtype != torch.int64 or not rows.is_contiguous() or rows.device.type != "cpu":
        return None
    lib = _load()
    if lib is None:
        return None
    E, h, d = w1.shape
    M = rows.numel()
    offsets = torch.tensor([0, *counts], dtype=torch.int64).cumsum_(0)
    out = torch.empty((M + 1, d), dtype=x.dtype)
    out[M].zero_()
    threads = torch.get_num_threads() if _state["threaded"] else 1

    def ptr(t):
        return None if t is None else t.data_ptr()

    rc = lib.moefx_expert_mlp_f32(
        ptr(x), x.stride(0), ptr(rows), ptr(offsets), E, ptr(gate), int(gate_input), ptr(w1), ptr(b1),
        ptr(w3), ptr(b3), ptr(w2), ptr(b2), d, h, ACTIVATIONS[activation], ptr(out), threads)
    return out if rc == 0 else None

"""Cheap repeated launches: plan once per input signature, then launch the compiled kernel directly.

A launcher's work per call is mostly host-side: checking its inputs, choosing blocks, grid and
config, and Triton's own ``kernel[grid](...)`` dispatch, which binds the arguments, recomputes
their specialization (dtypes, 16-byte pointer alignment, integers equal to 1 or divisible by 16)
and looks the compiled kernel up on every call. Launchers here do that work once per *signature*
(``tensor_key`` of every input plus the flags) and keep a plan: the checks passed, the grid and
the constexprs, and a ``KernelLaunch`` per kernel. The signature holds everything Triton
specializes on, so a plan's compiled kernel is the one Triton itself would pick, and a
``KernelLaunch`` calls that kernel's launcher (``CompiledKernel.run``) with the arguments as they
are, as ``JITFunction.run`` does at its end.

The direct path is off under the interpreter, with ZOO_FAST_LAUNCH=0, while Triton launch hooks
(profilers) are installed, and where this Triton lacks the API (then every call goes through
``kernel[grid](...)``); the first call of each ``KernelLaunch`` always goes through Triton, which
compiles the kernel.
"""

import inspect
import os

import torch

import kernels.utils
from kernels.utils import INTERPRET

try:  # Triton >= 3.4
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - older Triton: every launch through kernel[grid]
    _knobs = None

DIRECT = os.environ.get("ZOO_FAST_LAUNCH", "1") != "0" and not INTERPRET and _knobs is not None

_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def tensor_key(t: torch.Tensor | None) -> tuple | None:
    """What a launcher's checks and plan, and Triton's specialization, read off a tensor:
    shape, strides, dtype, device and whether its data is 16-byte aligned."""
    if t is None:
        return None
    return (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0)


_plan_caches: list["PlanCache"] = []


def clear_plans() -> None:
    """Forget every launcher's plans (the next call of each signature plans again)."""
    for cache in _plan_caches:
        cache.clear()


class PlanCache(dict):
    """Plans by signature. Bounded: a workload that keeps changing shapes starts over rather than
    growing without end. Plans hold the PDL choice and the kernel options: switching
    kernels.utils.PDL or calling kernels.utils.set_kernel_options drops them."""

    def __init__(self, max_plans: int = 4096) -> None:
        super().__init__()
        self.max_plans = max_plans
        self.pdl = kernels.utils.PDL
        self.options = kernels.utils.KERNEL_OPTIONS
        _plan_caches.append(self)

    def get(self, key, default=None):
        # identity, not equality: set_kernel_options binds a new dict (cheap on every launch)
        if self.pdl != kernels.utils.PDL or self.options is not kernels.utils.KERNEL_OPTIONS:
            self.clear()
            self.pdl = kernels.utils.PDL
            self.options = kernels.utils.KERNEL_OPTIONS
        return dict.get(self, key, default)

    def put(self, key, plan):
        if len(self) >= self.max_plans:
            self.clear()
        self[key] = plan
        return plan


def _hooks_installed() -> bool:
    """Whether a launch hook is set: a function (older Triton) or a non-empty HookChain."""
    runtime = _knobs.runtime
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


class KernelLaunch:
    """One kernel with a fixed grid, constexprs and launch options (``meta``), launched with the
    runtime arguments of each call: ``launch(*args)`` does what ``kernel[grid](*args, **meta)``
    does. The caller guarantees that every call's arguments have the signature of the first
    (same dtypes, pointer alignment and integer values up to Triton's specialization)."""

    __slots__ = ("kernel", "grid", "meta", "direct")

    def __init__(self, kernel, grid: tuple, meta: dict) -> None:
        self.kernel = kernel
        self.grid = tuple(grid)
        self.meta = meta
        self.direct = None  # (launcher, grid x3, device, function, packed metadata, constexprs)

    def __call__(self, *args) -> None:
        direct = self.direct
        if direct is not None and DIRECT and not _hooks_installed():
            run, grid_0, grid_1, grid_2, device, function, packed, tail = direct
            run(grid_0, grid_1, grid_2, _raw_stream(device), function, packed, None, None, None,
                *args, *tail)  # fmt: skip
            return
        compiled = self.kernel[self.grid](*args, **self.meta)
        if direct is None and DIRECT:
            self.direct = _direct_launch(self.kernel, self.grid, compiled, len(args), self.meta)


def _direct_launch(kernel, grid: tuple, compiled, n_args: int, meta: dict) -> tuple | None:
    """What KernelLaunch needs to launch `compiled` without Triton's dispatch, or None where this
    Triton's objects do not have the expected shape (the launch then stays on kernel[grid])."""
    if hasattr(compiled, "result"):  # a compile future
        compiled = compiled.result()
    if _raw_stream is None or not hasattr(compiled, "packed_metadata"):
        return None
    try:
        run, function = compiled.run, compiled.function
        params = list(kernel.signature.parameters.values())
    except AttributeError:
        return None
    if function is None or len(grid) > 3:
        return None
    # JITFunction.run hands the launcher every parameter in order, constexprs included: the
    # positional arguments of each call, then the constexprs and defaults fixed here.
    tail = []
    for param in params[n_args:]:
        if param.name in meta:
            tail.append(meta[param.name])
        elif param.default is not inspect.Parameter.empty:
            tail.append(param.default)
        else:
            return None
    grid = (*grid, 1, 1)[:3]
    device = torch.cuda.current_device()
    return (run, *grid, device, function, compiled.packed_metadata, tuple(tail))

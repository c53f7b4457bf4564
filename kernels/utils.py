"""Small helpers shared by the kernels and their launchers (no kernels here)."""

import functools
import os

import torch
import triton
import triton.language as tl

# The interpreter runs every program instance on the CPU: launchers pick large fixed blocks
# there and skip autotuning (which needs a GPU driver).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1); plain int arithmetic, called per launch."""
    return 1 << (max(int(n), 1) - 1).bit_length()


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: launchers ask on every call)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def is_hopper_or_newer(device: torch.device) -> bool:
    """sm_90+: TMA and programmatic dependent launch."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


@functools.cache
def max_shared_memory(device: torch.device) -> int:
    """Bytes of shared memory one program may use on a CUDA device (227 KiB on Hopper), as Triton
    reads it for its own out-of-resources check."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


# Programmatic dependent launch (PDL): on Hopper a kernel's programs may be scheduled while the
# previous kernel on the stream is still finishing, so launch latency and the first instructions
# overlap its tail. Every kernel here waits for the previous grid (wait_for_previous_grid) before
# it touches memory the previous kernel may use, so results are unchanged. It pays where kernels
# last a few microseconds (small Bert shapes, decode steps); at 1024 tokens and more it cost time
# (the README's H200 tables), so only launches over at most PDL_MAX_ROWS rows (tokens) use it.
# ZOO_PDL=0 turns it off.
PDL = os.environ.get("ZOO_PDL", "1") != "0"
PDL_MAX_ROWS = 256


# Kernel choices built and tested side by side; the first value of each is the default (chosen
# by benchmarks/bench_options.py on the H200: the README's kernel-options table). A run picks others
# with ZOO_KERNELS (e.g. ZOO_KERNELS="matmul_decode_table=0,epilogue_subtile=2") or
# set_kernel_options. Launch plans made under other options are dropped when they change; CUDA
# graphs captured before keep the kernels they captured.
KERNEL_OPTION_CHOICES = {
    # matmul at M 17..128 (decode batches): one row block spans the batch, K split to fill the SMs
    "matmul_decode_table": (1, 0),
    # decode attention: split-KV factor for several programs per SM at every batch
    "decode_split_table": (0, 1),
    # persistent TMA matmul: the epilogue in 1, 2 or 4 column slices of the accumulator
    "epilogue_subtile": (1, 2, 4),
    # persistent TMA matmul: the output stored through a TMA descriptor
    "tma_store": (1, 0),
    # persistent TMA matmul: Triton's warp specialization of the tile loop (Triton >= 3.4)
    "warp_specialize": (0, 1),
    # FP8 x FP8 matmul (large M): 1 leaves the partial sums in the tensor cores' accumulation
    # (about 14 mantissa bits, the error growing with K) instead of adding each K slice in fp32
    "fp8_fast_accum": (0, 1),
    # FP8 weights at M = 1 (decode at batch 1): a matrix-vector kernel without tensor cores,
    # instead of the tl.dot kernel with x padded to 16 rows
    "fp8_matvec": (1, 0),
    # 16-bit (and fp32) weights at M = 1 through the same matrix-vector kernel, instead of the
    # tl.dot kernel with x padded to 16 rows
    "matvec": (1, 0),
    # the matrix-vector kernel loads its first weight step before waiting for the previous
    # kernel (PDL), so the weight stream starts while that kernel finishes
    "matvec_preload": (1, 0),
    # the matrix-vector kernel split along K for weights of few, long rows (_matvec_split_k)
    "fp8_matvec_split_k": (1, 0),
    # FP8 weights converted in registers (2 <= M <= fp8_dot_min_m): out^T = W x^T, so the
    # converted weight tile is the dot's left operand, which the tensor cores read from registers
    "fp8_swap_ab": (1, 0),
    # FP8 weights converted in registers for a bf16 x: into fp16 (one conversion per two weights,
    # where bf16 takes three), x scaled per row by a power of two into fp16 first (scale_to_fp16)
    "fp8_fp16_x": (1, 0),
    # FP8 weights: the RMSNorm of a projection's input (matmul's rms_norm_weight) computed by the
    # kernel that scales x into fp16 or quantizes it to FP8, instead of a norm kernel before it
    "fp8_fused_norm": (1, 0),
    # FP8 weights: M buckets above this quantize x per row for the FP8 tensor cores (at or below
    # it the weights are converted in registers for a 16-bit tl.dot)
    "fp8_dot_min_m": (64, 16),
}


def parse_kernel_options(text: str) -> dict[str, int]:
    """'a,b=2' -> every option's value (the first choice unless named; a bare name means 1)."""
    options = {name: choices[0] for name, choices in KERNEL_OPTION_CHOICES.items()}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in KERNEL_OPTION_CHOICES:
            raise ValueError(
                f"ZOO_KERNELS: unknown option {name!r}, expected one of {list(KERNEL_OPTION_CHOICES)}"
            )
        try:
            number = int(value) if value else 1
        except ValueError:
            number = None
        if number not in KERNEL_OPTION_CHOICES[name]:
            raise ValueError(
                f"ZOO_KERNELS: {name}={value!r}, expected one of {KERNEL_OPTION_CHOICES[name]}"
            )
        options[name] = number
    return options


KERNEL_OPTIONS = parse_kernel_options(os.environ.get("ZOO_KERNELS", ""))


def set_kernel_options(**changes: int) -> dict[str, int]:
    """Change kernel options for the launches that follow (benchmarks compare them); returns the
    previous options, which set_kernel_options(**previous) restores."""
    global KERNEL_OPTIONS
    previous = KERNEL_OPTIONS
    text = ",".join(f"{name}={value}" for name, value in {**previous, **changes}.items())
    KERNEL_OPTIONS = parse_kernel_options(text)  # a new dict: launch plans notice the change
    return dict(previous)


def pdl_meta(device: torch.device, rows: int) -> dict:
    """Launch keywords of a kernel over `rows` token rows: the USE_PDL constexpr and Triton's
    launch_pdl option."""
    enabled = PDL and rows <= PDL_MAX_ROWS and not INTERPRET and is_hopper_or_newer(device)
    return {"USE_PDL": enabled, "launch_pdl": enabled}


@triton.jit
def wait_for_previous_grid(USE_PDL: tl.constexpr):
    """First statement of every kernel: with PDL, block until the previous kernel on the stream
    has finished and its writes are visible, then let the next kernel's programs be scheduled."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise ValueError(
            f"{name}: the last dimension must be contiguous, got strides {tuple(t.stride())}"
        )


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands get IEEE fp32 products (tl.dot defaults to tf32 on the GPU), as torch does."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_attention_inputs(q, k, v, kv_start, kv_end, bias):
    """Shared checks of the attention launchers. q [B, Tq, Hq, D]; k, v [B, S, Hkv, D] with a
    contiguous last dim; kv_start / kv_end contiguous int32 [B] or None; bias broadcastable to
    [B, Hq, Tq, S] in fp32 or q's dtype. Returns the bias expanded to that shape (or None)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v: expected 4-d tensors [B, T, H, D]")
    batch, seq_q, heads_q, head_dim = q.shape
    _, seq_k, heads_kv, _ = k.shape
    if k.shape != (batch, seq_k, heads_kv, head_dim) or v.shape != k.shape:
        raise ValueError(
            f"k, v: expected shape {(batch, seq_k, heads_kv, head_dim)}, "
            f"got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if heads_q % heads_kv != 0:
        raise ValueError(f"Hq ({heads_q}) must be a multiple of Hkv ({heads_kv})")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v: dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_last_dim_contiguous(name, t)
    for name, t in (("kv_start", kv_start), ("kv_end", kv_end)):
        if t is not None and (
            t.shape != (batch,) or t.dtype != torch.int32 or not t.is_contiguous()
        ):
            raise ValueError(f"{name}: expected a contiguous int32 tensor of shape ({batch},)")
    if bias is None:
        return None
    if bias.dtype not in (torch.float32, q.dtype):
        raise ValueError(f"bias: dtype {bias.dtype} must be float32 or {q.dtype}")
    return bias.expand(batch, heads_q, seq_q, seq_k)


def check_window(window: int | None, causal: bool = True) -> None:
    """A sliding window is a positive number of keys and only applies to causal attention."""
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window: expected a positive int of keys or None, got {window!r}")
    if not causal:
        raise ValueError("window: a sliding window needs causal=True")

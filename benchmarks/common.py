"""Measurement helpers shared by the GPU benchmarks: the card's limits and robust timings."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import triton.testing
from torch.profiler import ProfilerActivity, profile

# HF peer numbers live here; BENCH_RESULTS moves them (e.g. to an output folder of a GPU run)
RESULTS = Path(os.environ.get("BENCH_RESULTS", Path(__file__).parent / "results"))


def measure_copy_bandwidth() -> float:
    """Device-to-device copy of 2 GiB, in bytes/s counting bytes read plus written."""
    src = torch.empty(2**30, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def measure_matmul_flops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=200, return_mode="median")
    return 2 * 8192**3 / (ms * 1e-3)


@dataclass(frozen=True)
class Roofline:
    """The card's limits measured in this run: a device-to-device copy's bandwidth and a large
    bf16 matmul's rate. A workload's floor is the larger of its bytes over the bandwidth and its
    FLOPs over the matmul rate; `percent` is how close a measured time comes to that floor."""

    copy_Bps: float
    matmul_flops: float

    @classmethod
    def measure(cls) -> Roofline:
        return cls(measure_copy_bandwidth(), measure_matmul_flops())

    def floor_s(self, bytes_moved: float, flops: float) -> float:
        return max(bytes_moved / self.copy_Bps, flops / self.matmul_flops)

    def bound(self, bytes_moved: float, flops: float) -> str:
        """'memory' or 'compute': which of the two limits sets the floor."""
        return "memory" if bytes_moved / self.copy_Bps >= flops / self.matmul_flops else "compute"

    def percent(self, seconds: float | None, bytes_moved: float, flops: float) -> float | None:
        """Our % of the roofline: floor / measured time (100 is the hardware's limit)."""
        if seconds is None or seconds <= 0:
            return None
        return 100 * self.floor_s(bytes_moved, flops) / seconds

    def header(self) -> str:
        return (
            f"roofline: copy {self.copy_Bps / 1e12:.2f} TB/s, bf16 matmul "
            f"{self.matmul_flops / 1e12:.0f} TFLOP/s (both measured in this run)"
        )

    def limits(self) -> dict:
        """The two measured limits as a result JSON stores them."""
        return {"copy_bandwidth_Bps": self.copy_Bps, "bf16_matmul_flops": self.matmul_flops}

    def fields(self, seconds: float | None, bytes_moved: float, flops: float) -> dict:
        """A table row's roofline numbers: the floor (ms), what bounds it and our % of it."""
        return {
            "floor_ms": 1e3 * self.floor_s(bytes_moved, flops),
            "floor_bound": self.bound(bytes_moved, flops),
            "roofline_pct": self.percent(seconds, bytes_moved, flops),
            "bytes_moved": bytes_moved,
            "flops": flops,
        }


def roofline_cells(row: dict, digits: int = 3) -> str:
    """'| floor ms (bound) | % |' cells of a row that holds Roofline.fields."""
    pct = row.get("roofline_pct")
    return (
        f"| {row['floor_ms']:.{digits}f} ({row['floor_bound']}) "
        f"| {f'{pct:.0f}%' if pct is not None else 'n/a'} |"
    )


def head_weight(model: torch.nn.Module) -> torch.Tensor | None:
    """The output head's weight of a language model (a tied head is the word embedding), or None
    (an encoder such as Bert)."""
    head = getattr(model, "lm_head", None)
    if head is not None:
        return head.weight
    for name in ("embed", "wte", "shared"):  # the word embedding of our decoders and T5
        if hasattr(model, name):
            return getattr(model, name).weight
    return None


def _gathered_only(model: torch.nn.Module) -> set[int]:
    """ids of the embedding tables read only by row gathers (never by a matmul)."""
    head = head_weight(model)
    return {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, torch.nn.Embedding) and m.weight is not head
    }


def weight_bytes(model: torch.nn.Module, rows_gathered: int) -> float:
    """Bytes of weights a forward reads: every parameter once, except that a table read only by
    row gathers (an untied word embedding, position tables) counts only the rows it serves."""
    gathered = _gathered_only(model)
    total = 0.0
    for p in {id(p): p for p in model.parameters()}.values():
        if id(p) in gathered:
            total += min(rows_gathered, p.shape[0]) * p[0].numel() * p.element_size()
        else:
            total += p.numel() * p.element_size()
    return total


def matmul_params(model: torch.nn.Module) -> int:
    """Weights each token multiplies (2 FLOPs apiece): every 2D parameter except the tables read
    only by row gathers (a tied head counts once, as the head)."""
    gathered = _gathered_only(model)
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.dim() == 2 and id(p) not in gathered)


def wall_ms(fn, warmup: int, repeats: int) -> float:
    """Median wall time of fn in ms, synced before and after each call, after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def median_seconds(fn, repeats: int = 3) -> float:
    """wall_ms in seconds after one warm-up call (compilation, autotuning, graph capture)."""
    return wall_ms(fn, warmup=1, repeats=repeats) / 1e3


def call_ms(fn, warmup: int = 10, repeats: int = 50) -> float:
    """Median ms of one call as a user makes it: the GPU idle before the call, CUDA events around
    it, a sync after. Host work (launches, input checks, host syncs) that the GPU waits on counts;
    unlike do_bench, calls never overlap the previous call's GPU work."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def gpu_kernel_ms(fn) -> tuple[float, int]:
    """(ms, count) of the GPU kernels one call of fn runs: their summed durations in a
    torch.profiler trace (kernels replayed from a CUDA graph included; copies and fills left
    out), after one untraced call that compiles, autotunes and captures."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [
        e
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
        and not e.name.startswith(("Memcpy", "Memset"))
    ]
    return sum(e.device_time_total for e in kernels) / 1e3, len(kernels)


class ClockLog:
    """The card's SM clock, power draw and power-cap flag, sampled by nvidia-smi in the background
    (read-only queries; nothing is set), so that a timed interval reports what the card ran at.
    Without nvidia-smi it records nothing and summaries are empty."""

    # clock-event bit 0x4: the software power cap is lowering the clocks
    _POWER_CAP = 0x4

    def __init__(self, interval_ms: int = 100) -> None:
        self.samples: list[tuple[float, float, float, bool]] = []  # time, MHz, W, power capped
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        query = "clocks.sm,power.draw,clocks_throttle_reasons.active"
        command = ["nvidia-smi", f"--id={index}", f"--query-gpu={query}"]
        command += ["--format=csv,noheader,nounits", f"--loop-ms={interval_ms}"]
        try:
            self._process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
        except OSError:
            self._process = None
            return
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self._process.stdout:
            try:
                mhz, watts, reasons = (field.strip() for field in line.split(","))
                capped = bool(int(reasons, 16) & self._POWER_CAP)
                self.samples.append((time.time(), float(mhz), float(watts), capped))
            except ValueError:  # a header or a field the card does not report
                continue

    def summary(self, start: float, end: float) -> dict:
        """Mean and lowest SM clock, mean power and % of samples power-capped in [start, end]
        (time.time() seconds); empty if no sample falls inside."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if not inside:
            return {}
        return {
            "sm_mhz_mean": sum(s[1] for s in inside) / len(inside),
            "sm_mhz_min": min(s[1] for s in inside),
            "watts_mean": sum(s[2] for s in inside) / len(inside),
            "power_capped_pct": 100 * sum(s[3] for s in inside) / len(inside),
        }

    def close(self) -> None:
        if self._process is not None:
            self._process.terminate()


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """'1x128,8x512' -> [(1, 128), (8, 512)] (any number of dims per shape)."""
    return [tuple(int(v) for v in shape.split("x")) for shape in text.split(",")]


def gpu_tag() -> str:
    """File-name form of the GPU's name, e.g. 'nvidia-h200'."""
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def load_peers(path: Path, measure=None) -> dict:
    """HF peer numbers stored for this GPU kind at path ({} when none). With measure (--peers),
    measure(save) runs first and calls save(partial result) as each row is done: a run cut short
    keeps the rows it finished, and rows stored before (other shapes) are kept."""
    stored = json.loads(path.read_text()) if path.is_file() else {}
    if measure is None:
        return stored

    def save(result: dict) -> None:
        rows = {**stored.get("rows", {}), **result.get("rows", {})}
        stored.update(result)
        stored.update(
            rows=rows,
            device=torch.cuda.get_device_name(),
            date=time.strftime("%Y-%m-%d"),
            torch=torch.__version__,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(stored, indent=2))

    save(measure(save))
    return stored


def attempt(what: str, fn):
    """fn(), or None after printing the error: one peer that fails (a compile error of a stock
    library, say) is reported in the table as n/a instead of ending the run."""
    try:
        return fn()
    except Exception:  # any failure of a peer is reported, not raised
        print(f"  {what} failed:\n{traceback.format_exc()}", flush=True)
        return None


def write_result(path: str, device: str, **fields) -> None:
    """A benchmark's JSON: the device, date and versions, then its own fields."""
    result = {
        "device": device,
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        **fields,
    }
    Path(path).write_text(json.dumps(result, indent=2))


def fmt(value: float | None, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if value is not None else "n/a"


def ratio(numerator: float | None, denominator: float | None, digits: int = 2) -> str:
    """'1.23x', or 'n/a' when either side is missing."""
    if numerator is None or denominator is None:
        return "n/a"
    return f"{numerator / denominator:.{digits}f}x"


def accepts(fn, name: str) -> bool:
    """Whether fn takes a keyword argument called name (e.g. a model's forward and cuda_graph)."""
    return name in inspect.signature(fn).parameters

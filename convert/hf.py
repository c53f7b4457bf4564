"""Hugging Face checkpoints: find the files, read config.json, stream safetensors into parameters.

Only safetensors are read (never pickle). Tensors are streamed shard by shard and tensor by tensor
straight into preallocated parameters (on their device and dtype), so the host never holds the
model twice: a fused parameter (QKV, gate-up) is assembled in place from its parts, wherever the
parts sit among the shards. Each tensor is read through its own memory map, unmapped once it has
been copied, so the file pages resident at any time are one tensor's, not a shard's: loading to a
GPU holds about one tensor in host memory, loading to the CPU the model plus one tensor. A
tensor-parallel rank reads only its rows or columns of each tensor (a Target's Part).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from convert.fp8 import FP8_HEADER_DTYPE, quantize_rows

# Files a model needs; everything else in a hub repo (pickles, other frameworks' weights) is skipped.
CHECKPOINT_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
]

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file, key or shape at fault."""


class HubError(OSError):
    """The Hugging Face Hub could not provide a checkpoint (offline, gated, not found): the
    message says which repo and what to do."""


def download(
    repo_id: str, revision: str | None = None, patterns: list[str] = CHECKPOINT_PATTERNS
) -> Path:
    """Fetch a hub repo's config, safetensors and tokenizer files into the HF cache (or find them
    there when offline: HF_HUB_OFFLINE=1) and return the snapshot folder. A hub failure becomes
    one HubError with the remedy, not the HTTP library's traceback."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:
        raise HubError(hub_failure(e, repo_id, revision)) from None


def hub_failure(error: Exception, repo_id: str, revision: str | None) -> str:
    """One short message for a huggingface_hub / network exception of a download of repo_id."""
    from huggingface_hub import errors

    where = repo_id if revision is None else f"{repo_id} (revision {revision!r})"
    page = f"https://huggingface.co/{repo_id}"
    # GatedRepoError is a RepositoryNotFoundError, and RevisionNotFoundError an HTTP error: the
    # order of these checks matters
    if isinstance(error, errors.GatedRepoError):
        return (
            f"{repo_id} is gated: accept its licence at {page}, then log in with "
            "`hf auth login` (or `huggingface-cli login`) or set HF_TOKEN"
        )
    if isinstance(error, errors.RevisionNotFoundError):
        return f"{repo_id} has no revision {revision!r} (a branch, tag or commit) on the Hub"
    if isinstance(error, errors.RepositoryNotFoundError):
        return (
            f"{repo_id}: no such model repo on the Hugging Face Hub (or it is private: log in "
            "with `hf auth login`)"
        )
    offline = isinstance(error, (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError))
    if offline or _is_connection_error(error):
        return (
            f"{where}: the Hugging Face Hub cannot be reached and the HF cache has no copy. "
            "Download it once where there is a network (it lands in the HF cache, "
            "HF_HOME / HF_HUB_CACHE), load a local checkpoint folder instead, or set "
            "HF_HUB_OFFLINE=1 to use only what is cached"
        )
    if isinstance(error, errors.HfHubHTTPError):
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "HTTP error"
        return f"{where}: the Hugging Face Hub answered with an error: {first_line}"
    return f"{where}: download failed ({type(error).__name__}: {error})"


def _is_connection_error(error: Exception) -> bool:
    """httpx / requests / socket failures to connect or time out (the HTTP library depends on the
    huggingface_hub version)."""
    names = {cls.__name__ for cls in type(error).__mro__}
    connection_names = {
        "ConnectError",
        "ConnectionError",
        "NetworkError",
        "Timeout",
        "TimeoutException",
    }
    return bool(names & connection_names) or isinstance(error, (ConnectionError, TimeoutError))


def read_json(path: Path) -> dict:
    """A JSON file that must hold an object; anything else is a CheckpointError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(
            f"{path}: expected a JSON object ({{...}}), got a JSON {type(value).__name__}"
        )
    return value


def read_config(folder: Path) -> dict:
    """config.json of a checkpoint folder."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (not a Hugging Face checkpoint folder)")
    return read_json(path)


def read_generation_config(folder: Path) -> dict:
    path = Path(folder) / "generation_config.json"
    return read_json(path) if path.is_file() else {}


def safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors shards, from the index when there is one."""
    folder = Path(folder)
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no 'weight_map'")
        names = sorted(set(weight_map.values()))
        for name in names:
            if not isinstance(name, str) or Path(name).name != name or not name:
                raise CheckpointError(f"{index} names shard {name!r}, not a file name in {folder}")
        files = [folder / name for name in names]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"{index} names shard {file.name}, which is missing")
        return files
    if (folder / SAFETENSORS_SINGLE).is_file():
        return [folder / SAFETENSORS_SINGLE]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(
        p.name for p in folder.glob("*.pt")
    )
    if pickles:
        raise CheckpointError(
            f"{folder}: only pickle weights ({', '.join(pickles)}); they are never unpickled here. "
            "Convert the checkpoint to safetensors (e.g. save_pretrained(..., safe_serialization=True))."
        )
    raise FileNotFoundError(f"{folder}: no *.safetensors weights")


def _open(file: Path):
    """safe_open of one file; its header (JSON, dtypes, offsets within the file size) is checked
    here, before any tensor is read."""
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e


def iter_tensors(
    files: list[Path], part_of: Callable[[str], Part | None] = lambda key: None
) -> Iterator[tuple[str, Path, torch.Tensor]]:
    """Yield (key, file, tensor) one tensor at a time: a CPU tensor read from the memory-mapped
    file. Each tensor gets its own mapping, released as soon as the consumer lets go of the tensor
    and asks for the next one, so the file pages resident in memory are one tensor's at a time
    (mapped pages that were read count toward RSS until unmapped). part_of(key): the slice of
    that tensor to read (None: all of it); only the slice's bytes are copied out of the file."""
    for file in files:
        with _open(file) as f:
            keys = list(f.keys())
        for key in keys:
            part = part_of(key)
            with _open(file) as f:
                try:
                    if part is None:
                        tensor = f.get_tensor(key)
                    else:
                        tensor = _read_part(f, key, part)
                except CheckpointError as e:
                    raise CheckpointError(f"{file}: {e}") from None
                except Exception as e:
                    raise CheckpointError(f"{file}: tensor {key!r} cannot be read ({e})") from e
            yield key, file, tensor
            del tensor  # the last reference to this tensor's mapping: unmapped here


def _read_part(f, key: str, part: Part) -> torch.Tensor:
    """part of tensor key of an open safetensors file, its extent checked first."""
    stored = f.get_slice(key)
    shape = tuple(stored.get_shape())
    if part.dim >= len(shape) or shape[part.dim] != part.size:
        raise CheckpointError(
            f"tensor {key!r} has shape {shape}: expected size {part.size} along dimension "
            f"{part.dim} (from config.json)"
        )
    pieces = [stored[index] for index in part.indices()]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=part.dim)


def tensor_names(files: list[Path]) -> set[str]:
    """The names of the tensors in the checkpoint files (headers only: no tensor is read)."""
    names: set[str] = set()
    for file in files:
        with _open(file) as f:
            names.update(f.keys())
    return names


@dataclass(frozen=True)
class Header:
    """What a safetensors header says of one tensor (no data read)."""

    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' spelling: F32, BF16, I8, ...


def read_headers(files: list[Path]) -> dict[str, Header]:
    """key -> Header of every tensor in the checkpoint files, from the headers alone; a key
    stored in two files is refused here."""
    headers: dict[str, Header] = {}
    for file in files:
        with _open(file) as f:
            for key in f.keys():
                if key in headers:
                    raise CheckpointError(
                        f"{file}: tensor {key!r} also appears in {headers[key].file.name}"
                    )
                part = f.get_slice(key)
                headers[key] = Header(file, tuple(part.get_shape()), part.get_dtype())
    return headers


# The most keys an error message lists; the rest are counted.
LISTED_KEYS = 5


def key_listing(keys: list[str]) -> str:
    """'a, b, c' or, for many, 'a, b, c, d, e and 995 more': error messages stay short."""
    shown = ", ".join(keys[:LISTED_KEYS])
    more = len(keys) - LISTED_KEYS
    return f"{shown} and {more} more" if more > 0 else shown


# safetensors header dtypes loaded (converted to the model's dtype): LOADABLE_DTYPES' spelling
LOADABLE_HEADER_DTYPES = ("F32", "F16", "BF16", "F64")
# torch's names of the other header dtypes, for messages
HEADER_DTYPE_NAMES = {
    "I8": "torch.int8",
    "U8": "torch.uint8",
    "I16": "torch.int16",
    "I32": "torch.int32",
    "I64": "torch.int64",
    "BOOL": "torch.bool",
    "F8_E4M3": "torch.float8_e4m3fn",
    "F8_E5M2": "torch.float8_e5m2",
}


def check_checkpoint(
    headers: dict[str, Header],
    key_map: KeyMap,
    normalize_key: Callable[[str], str] = lambda key: key,
    optional: frozenset[str] = frozenset(),
) -> None:
    """The checkpoint's tensor names against the key map, from the headers, before the model
    is built: missing and unexpected tensors are reported by count and first few keys (a config
    that asks for 50 layers of a 2-layer checkpoint fails here, at once)."""
    where = f"{next(iter(headers.values())).file.parent}: " if headers else ""
    present = {normalize_key(key): key for key in headers}
    unexpected = [
        f"{key} ({headers[key].file.name})" for n, key in present.items() if n not in key_map
    ]
    if unexpected:
        raise CheckpointError(
            f"{where}{len(unexpected)} unexpected tensor(s) in the checkpoint (not used by this "
            f"architecture as config.json describes it): {key_listing(unexpected)}"
        )
    missing = [
        k for k, t in key_map.items() if t is not DROP and k not in present and k not in optional
    ]
    if missing:
        raise CheckpointError(
            f"{where}checkpoint is missing {len(missing)} tensor(s) that config.json implies: "
            f"{key_listing(missing)}"
        )
    for key, header in headers.items():
        target = key_map.get(normalize_key(key))
        if target is DROP:
            continue
        if target.fp8 == "bits":
            if header.dtype != FP8_HEADER_DTYPE:
                raise CheckpointError(
                    f"{header.file}: tensor {key!r} has dtype "
                    f"{HEADER_DTYPE_NAMES.get(header.dtype, header.dtype)}; the other parts of "
                    f"{target.param} are torch.float8_e4m3fn, and so must it be"
                )
        elif header.dtype not in LOADABLE_HEADER_DTYPES:
            raise CheckpointError(
                f"{header.file}: tensor {key!r} has dtype "
                f"{HEADER_DTYPE_NAMES.get(header.dtype, header.dtype)}; expected one of "
                f"{', '.join(str(d) for d in LOADABLE_DTYPES)} (quantized checkpoints are "
                "unsupported)"
            )


def check_shapes(
    model: torch.nn.Module,
    headers: dict[str, Header],
    key_map: KeyMap,
    normalize_key: Callable[[str], str] = lambda key: key,
) -> None:
    """Every checkpoint tensor's header shape against the parameter rows it fills. The model may
    be on the meta device (shapes only), so a config.json whose sizes disagree with the checkpoint
    fails before any memory is allocated."""
    params = dict(model.named_parameters())
    _check_coverage(params, key_map)
    for key, header in headers.items():
        target = key_map.get(normalize_key(key))
        if target is DROP:
            continue
        expected = _expected_shapes(params[target.param], target)
        if header.shape not in expected:
            raise _shape_error(header.file, key, header.shape, expected)


def _expected_shapes(param: torch.Tensor, target: Target) -> list[tuple[int, ...]]:
    """The shapes a checkpoint tensor may have to fill target's rows of param, as stored: one,
    except for scales (per tensor or per row)."""
    row_end = param.shape[0] if target.row_end is None else target.row_end
    rows = row_end - target.row_start
    if target.fill == "scale":
        return [(), (1,), (rows,), (rows, 1)]
    if target.fill == "max":
        return [(), (1,)]
    shape = (rows, *param.shape[1:])
    shape = shape[::-1] if target.transpose else shape
    if target.part is not None:  # a slice of it is read: its full extent there, as stored
        shape = tuple(target.part.size if d == target.part.dim else n for d, n in enumerate(shape))
    return [shape]


def _shape_error(file: Path, key: str, shape, expected: list) -> CheckpointError:
    shapes = " or ".join(str(tuple(e)) for e in expected)
    return CheckpointError(
        f"{file}: tensor {key!r} has shape {tuple(shape)}, expected {shapes} (from config.json)"
    )


@dataclass(frozen=True)
class Part:
    """What is read of a stored tensor (a tensor-parallel rank's share): the ranges [start, end)
    along dimension `dim` of the tensor as stored, concatenated in that order (several for a
    tensor that is itself fused: GPT-2's c_attn, a rank's q, k and v columns), out of its full
    extent `size` there."""

    dim: int
    ranges: tuple[tuple[int, int], ...]
    size: int

    @classmethod
    def span(cls, dim: int, start: int, end: int, size: int) -> Part:
        """One range [start, end) along dim."""
        return cls(dim, ((start, end),), size)

    def indices(self) -> list[tuple[slice, ...]]:
        return [(slice(None),) * self.dim + (slice(a, b),) for a, b in self.ranges]


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: rows [row_start, row_end) of a zoo parameter (all rows
    when row_end is None), transposed first when the checkpoint stores it (in, out) (GPT-2 Conv1D).
    part: only that slice of the stored tensor is read (None: all of it).

    FP8 weights (convert/fp8.py): fp8="bits" copies an F8_E4M3 tensor as it is; fp8="quantize"
    quantizes a float tensor per row, its scales going to the same rows of parameter `scale`.
    fill="scale": a per-tensor (one element) or per-row ([rows] / [rows, 1]) scale fills the rows;
    fill="max": a one-element tensor, the largest of all tensors sent to the parameter.
    """

    param: str
    row_start: int = 0
    row_end: int | None = None
    transpose: bool = False
    part: Part | None = None
    fp8: str | None = None
    scale: str | None = None
    fill: str = "rows"


# A key map sends each checkpoint key to a Target, or to DROP for tensors that are not parameters
# of ours (buffers, tied copies). Keys absent from the map are unexpected.
DROP = None

KeyMap = dict[str, Target | None]

# Checkpoint dtypes converted to the model's dtype on load; anything else (int8, fp8 of quantized
# checkpoints) would need scales this loader does not apply, and is refused rather than cast.
LOADABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def load_state(
    model: torch.nn.Module,
    files: list[Path],
    key_map: KeyMap,
    normalize_key: Callable[[str], str] = lambda key: key,
    optional: frozenset[str] = frozenset(),
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Fill model's parameters from the checkpoint files through key_map.

    normalize_key maps a checkpoint key to the key_map's spelling (e.g. drops a 'transformer.'
    prefix). Keys in `optional` may be absent (their targets are filled by the model itself, e.g.
    a tied head). Every other mapped key must be present exactly once; every checkpoint key must be
    mapped or dropped; shapes must match exactly. progress(done, total), when given, is called as
    each checkpoint tensor is read (counts of tensors, from the files' headers).
    """
    params = dict(model.named_parameters())
    _check_coverage(params, key_map)
    total = len(tensor_names(files)) if progress is not None else 0
    seen: dict[str, Path] = {}
    maxed: set[str] = set()  # fill="max" parameters written at least once
    unexpected: list[str] = []

    def part_of(raw_key: str) -> Part | None:
        target = key_map.get(normalize_key(raw_key))
        return None if target is DROP else target.part

    for done, (raw_key, file, tensor) in enumerate(iter_tensors(files, part_of), start=1):
        if progress is not None:
            progress(done, total)
        key = normalize_key(raw_key)
        if key not in key_map:
            unexpected.append(f"{raw_key} ({file.name})")
            continue
        if key in seen:
            raise CheckpointError(f"{file}: tensor {raw_key!r} also appears in {seen[key].name}")
        seen[key] = file
        target = key_map[key]
        if target is DROP:
            continue
        expected_dtypes = (torch.float8_e4m3fn,) if target.fp8 == "bits" else LOADABLE_DTYPES
        if tensor.dtype not in expected_dtypes:
            raise CheckpointError(
                f"{file}: tensor {raw_key!r} has dtype {tensor.dtype}; expected one of "
                f"{', '.join(str(d) for d in expected_dtypes)} (quantized checkpoints are "
                "unsupported)"
            )
        param = params[target.param]
        row_end = param.shape[0] if target.row_end is None else target.row_end
        destination = param.data[target.row_start : row_end]
        stored = tuple(tensor.shape)
        if target.part is not None:  # what was read is a slice: name the full extent
            dim = target.part.dim
            stored = (*stored[:dim], target.part.size, *stored[dim + 1 :])
        expected = _expected_shapes(param, target)
        source = tensor.t() if target.transpose else tensor
        if stored not in expected or (target.fill == "rows" and source.shape != destination.shape):
            raise _shape_error(file, raw_key, stored, expected)
        if target.fill == "scale":  # per tensor: one value for every row of the part
            destination.copy_(tensor.reshape(-1).expand(destination.shape[0]))
        elif target.fill == "max":
            value = tensor.reshape(1).to(destination.device, destination.dtype)
            first = target.param not in maxed
            destination.copy_(value if first else torch.maximum(destination, value))
            maxed.add(target.param)
        elif target.fp8 == "quantize":
            quantized, scale = quantize_rows(source.to(destination.device))
            destination.copy_(quantized)
            params[target.scale].data[target.row_start : row_end].copy_(scale)
            del quantized, scale
        else:
            destination.copy_(source)
        del tensor, source
    if unexpected:
        raise CheckpointError(
            f"{len(unexpected)} unexpected tensor(s) in the checkpoint (not used by this "
            f"architecture): {key_listing(unexpected)}"
        )
    missing = [
        k for k, t in key_map.items() if t is not DROP and k not in seen and k not in optional
    ]
    if missing:
        folder = files[0].parent
        raise CheckpointError(
            f"{folder}: checkpoint is missing {len(missing)} tensor(s): {key_listing(missing)}"
        )


def _check_coverage(params: dict[str, torch.nn.Parameter], key_map: KeyMap) -> None:
    """Every parameter of the model is filled, row by row, by exactly one checkpoint tensor."""
    rows: dict[str, list[tuple[int, int]]] = {name: [] for name in params}
    for key, target in key_map.items():
        if target is DROP:
            continue
        if target.param not in params:
            raise CheckpointError(f"key map sends {key!r} to unknown parameter {target.param!r}")
        end = params[target.param].shape[0] if target.row_end is None else target.row_end
        rows[target.param].append((target.row_start, end))
        if target.fp8 == "quantize":  # its scales come with it
            if target.scale not in params:
                raise CheckpointError(f"key map sends {key!r}'s scales to unknown {target.scale!r}")
            rows[target.scale].append((target.row_start, end))
    for name, spans in rows.items():
        covered = 0
        for start, end in sorted(spans):
            if start != covered:
                break
            covered = end
        if covered != params[name].shape[0]:
            raise CheckpointError(f"parameter {name!r} is not filled by any checkpoint tensor")

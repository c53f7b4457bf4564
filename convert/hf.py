"""Hugging Face checkpoints: find the files, read config.json, stream safetensors into parameters.

Only safetensors are read (never pickle). Tensors are streamed shard by shard and tensor by tensor
straight into preallocated parameters (on their device and dtype), so the host never holds the
model twice: a fused parameter (QKV, gate-up) is assembled in place from its parts, wherever the
parts sit among the shards. Each tensor is read through its own memory map, unmapped once it has
been copied, so the file pages resident at any time are one tensor's, not a shard's: loading to a
GPU holds about one tensor in host memory, loading to the CPU the model plus one tensor.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

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


def download(repo_id: str) -> Path:
    """Fetch a hub repo's config, safetensors and tokenizer files into the HF cache (or find them
    there when offline: HF_HUB_OFFLINE=1) and return the snapshot folder."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, allow_patterns=CHECKPOINT_PATTERNS))


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


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


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, Path, torch.Tensor]]:
    """Yield (key, file, tensor) one tensor at a time: a CPU tensor read from the memory-mapped
    file. Each tensor gets its own mapping, released as soon as the consumer lets go of the tensor
    and asks for the next one, so the file pages resident in memory are one tensor's at a time
    (mapped pages that were read count toward RSS until unmapped)."""
    for file in files:
        with _open(file) as f:
            keys = list(f.keys())
        for key in keys:
            with _open(file) as f:
                try:
                    tensor = f.get_tensor(key)
                except Exception as e:
                    raise CheckpointError(f"{file}: tensor {key!r} cannot be read ({e})") from e
            yield key, file, tensor
            del tensor  # the last reference to this tensor's mapping: unmapped here


def tensor_names(files: list[Path]) -> set[str]:
    """The names of the tensors in the checkpoint files (headers only: no tensor is read)."""
    names: set[str] = set()
    for file in files:
        with _open(file) as f:
            names.update(f.keys())
    return names


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: rows [row_start, row_end) of a zoo parameter (all rows
    when row_end is None), transposed first when the checkpoint stores it (in, out) (GPT-2 Conv1D)."""

    param: str
    row_start: int = 0
    row_end: int | None = None
    transpose: bool = False


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
    unexpected: list[str] = []
    for done, (raw_key, file, tensor) in enumerate(iter_tensors(files), start=1):
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
        if tensor.dtype not in LOADABLE_DTYPES:
            raise CheckpointError(
                f"{file}: tensor {raw_key!r} has dtype {tensor.dtype}; expected one of "
                f"{', '.join(str(d) for d in LOADABLE_DTYPES)} (quantized checkpoints are unsupported)"
            )
        param = params[target.param]
        row_end = param.shape[0] if target.row_end is None else target.row_end
        destination = param.data[target.row_start : row_end]
        source = tensor.t() if target.transpose else tensor
        if source.shape != destination.shape:
            stored = (
                tuple(destination.shape[::-1]) if target.transpose else tuple(destination.shape)
            )
            raise CheckpointError(
                f"{file}: tensor {raw_key!r} has shape {tuple(tensor.shape)}, expected {stored} "
                "(from config.json)"
            )
        destination.copy_(source)
        del tensor, source
    if unexpected:
        raise CheckpointError(
            f"unexpected tensors in the checkpoint (not used by this architecture): {', '.join(unexpected)}"
        )
    missing = [
        k for k, t in key_map.items() if t is not DROP and k not in seen and k not in optional
    ]
    if missing:
        folder = files[0].parent
        raise CheckpointError(f"{folder}: checkpoint is missing tensor(s): {', '.join(missing)}")


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
    for name, spans in rows.items():
        covered = 0
        for start, end in sorted(spans):
            if start != covered:
                break
            covered = end
        if covered != params[name].shape[0]:
            raise CheckpointError(f"parameter {name!r} is not filled by any checkpoint tensor")

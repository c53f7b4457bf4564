"""Bert, T5, GPT-2, Llama 3 and Granite in PyTorch on our own Triton kernels.

    import zoo
    zoo.list_models()
    model = zoo.load("llama3-8b")                  # a registry name, or a local HF checkpoint folder
    ids = model.generate(input_ids, max_new_tokens=32)

Importing this package is cheap: torch, triton and the models load on the first `load`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from zoo.registry import get_entry, list_models

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

__all__ = ["list_models", "load"]


def load(
    name_or_path: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    pretrained: bool = True,
    progress: Callable[[int, int], None] | None = None,
):
    """Build a zoo model from a registry name or a local Hugging Face checkpoint folder.

    A registry name (see `list_models()`) downloads the checkpoint's config, safetensors and
    tokenizer files into the HF cache on first use (HF_HUB_OFFLINE=1 uses the cache only); a folder
    path (config.json + *.safetensors) loads directly. The architecture comes from the checkpoint's
    own config.json (and what its tensors hold: Bert's pooler is built only when the checkpoint has
    one). `pretrained=False` builds the real architecture with random weights (from the
    registry's config, nothing downloaded). device defaults to cuda when present, else cpu;
    dtype to bfloat16 on cuda and float32 on cpu. device="meta" builds the shapes only.
    progress(done, total) is called as each checkpoint tensor is loaded (e.g. a progress bar).
    """
    import torch

    from convert import hf
    from zoo.generation import GenerationConfig
    from zoo.models import family_for

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: CUDA is not available here; use device='cpu'")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype: expected float32, float16 or bfloat16, got {dtype}")

    folder, hf_config, generation_config = _resolve(name_or_path, pretrained, hf)
    source = str(folder or name_or_path)
    family = family_for(hf_config, source)
    config = _config(family, hf_config, source, hf)
    files = hf.safetensors_files(folder) if pretrained else []
    if pretrained and family.config_from_checkpoint is not None:
        config = family.config_from_checkpoint(config, hf.tensor_names(files))
    with torch.device("meta"):
        model = family.model_class(config)
    model = model.to(dtype)
    if device.type != "meta":
        model = model.to_empty(device=device)
        if pretrained:
            hf.load_state(
                model, files, family.key_map(config), family.normalize_key, progress=progress
            )
        else:
            model.init_random()
    model.init_buffers()
    model.eval().requires_grad_(False)
    model.generation_config = GenerationConfig.from_dict(generation_config)
    model.tokenizer = _load_tokenizer(folder) if folder is not None else None
    return model


def _config(family, hf_config: dict, source: str, hf):
    """The family's config dataclass; a config.json that lacks a key or holds an unsupported value
    (rope_type, activation, quantization) fails here, before any weight is read, naming the
    checkpoint."""
    quantization = hf_config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else "?"
        raise hf.CheckpointError(
            f"{source}: quantized checkpoint (quantization_config, quant_method {method!r}) is "
            "unsupported; use a float32 / float16 / bfloat16 checkpoint"
        )
    try:
        return family.config_from_hf(hf_config)
    except KeyError as e:
        raise hf.CheckpointError(
            f"{source}: config.json has no {e.args[0]!r}, which model_type "
            f"{hf_config.get('model_type')!r} needs"
        ) from None
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e


def _resolve(name_or_path, pretrained, hf):
    """(checkpoint folder or None, config.json dict, generation_config dict)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not pretrained:
            raise ValueError("pretrained=False takes a registry name, not a folder")
        return path, hf.read_config(path), hf.read_generation_config(path)
    name = str(name_or_path)
    try:
        entry = get_entry(name)
    except KeyError:
        if path.exists() or name.startswith((".", "/", "~")):
            raise FileNotFoundError(f"{name}: not a checkpoint folder") from None
        raise
    if not pretrained:
        return None, dict(entry.config), dict(entry.generation_config)
    folder = hf.download(entry.repo_id)
    return folder, hf.read_config(folder), hf.read_generation_config(folder)


def _load_tokenizer(folder: Path):
    """The checkpoint's zoo.tokenizer.Tokenizer (tokenizer.json with its special tokens and chat
    template), or None without tokenizer.json."""
    from zoo.tokenizer import Tokenizer

    return Tokenizer.from_folder(folder)

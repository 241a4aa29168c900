"""Random-weights controls: the same architecture, untrained.

A finding "holds" only if the trained model shows it more than the same architecture with random weights
(``ffnlib.findings``). :func:`random_init` builds that control: the model's own initialiser, from its
config, seeded; the same tokenizer. Its name and hash come from the architecture (the config without its
paths and versions), the tokenizer's vocabulary and the seed, so its cached results are shared by every
model of that architecture and computed once.

:func:`cascading` is the option of Adebayo et al. ("Sanity checks for saliency maps", NeurIPS 2018): the
trained model with its top ``n_randomised`` blocks replaced by the control's, re-initialising the layers
from the top down one at a time as ``n_randomised`` grows. It is not the default control.
"""

from __future__ import annotations

import copy
import hashlib
import json

import torch

from .errors import ParameterError
from .models import LoadedModel
from .storage import fingerprint

__all__ = ["CONTROLS", "tokenizer_fingerprint", "control_id", "random_init", "cascading", "check_control"]

CONTROLS = ("random-init", "none")
_IGNORED = {"_name_or_path", "transformers_version", "architectures", "torch_dtype", "dtype", "_commit_hash",
            "name_or_path", "quantization_config"}


def _architecture(config) -> dict:
    data = config.to_dict()
    return {k: v for k, v in sorted(data.items()) if k not in _IGNORED}


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def control_id(loaded: LoadedModel, seed: int = 0) -> str:
    """The identity of ``loaded``'s random-weights control: a hash of the architecture, the tokenizer and
    the seed (and torch's version, whose generator draws the weights)."""
    return fingerprint({"architecture": _architecture(loaded.model.config),
                        "tokenizer": tokenizer_fingerprint(loaded.tokenizer), "seed": int(seed),
                        "torch": torch.__version__.split("+")[0], "initialiser": "from_config"})


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ParameterError(f"The control's seed must be a non-negative int, got {seed!r}.")
    return seed


def _initialised(loaded: LoadedModel, seed: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(loaded.model.config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # the same draw in every precision
    model.to(device=loaded.device, dtype=next(loaded.model.parameters()).dtype).eval()
    model.requires_grad_(False)
    return model


def random_init(loaded: LoadedModel, seed: int = 0) -> LoadedModel:
    """``loaded``'s architecture with weights from its own initialiser (``from_config``, seeded), and the same
    tokenizer: the random-weights control."""
    seed = _check_seed(seed)
    model = _initialised(loaded, seed)
    ident = control_id(loaded, seed)
    return LoadedModel(f"random-init-{ident[:12]}", model, loaded.tokenizer, type(loaded.adapter)(model),
                       f"random init of {loaded.name} (seed {seed})", ident, quantized=False, bos=list(loaded.bos),
                       precision=loaded.precision)


def cascading(loaded: LoadedModel, n_randomised: int, seed: int = 0) -> LoadedModel:
    """``loaded`` with its top ``n_randomised`` blocks re-initialised (their weights from the same seeded
    initialisation as :func:`random_init`); the embeddings, the other blocks, the final norm and the head stay
    trained. ``n_randomised = 0`` is the trained model, ``n_layers`` every block."""
    seed = _check_seed(seed)
    n_layers = loaded.adapter.n_layers
    if isinstance(n_randomised, bool) or not isinstance(n_randomised, int) or not 0 <= n_randomised <= n_layers:
        raise ParameterError(f"n_randomised must be an int in 0..{n_layers}, got {n_randomised!r}.")
    random_model = _initialised(loaded, seed)
    model = copy.deepcopy(loaded.model)
    adapter, random_adapter = type(loaded.adapter)(model), type(loaded.adapter)(random_model)
    with torch.no_grad():
        for layer in range(n_layers - n_randomised, n_layers):
            adapter.layer(layer).load_state_dict(random_adapter.layer(layer).state_dict())
    ident = fingerprint({"trained": loaded.file_hash, "control": control_id(loaded, seed), "top": n_randomised})
    return LoadedModel(f"{loaded.name}-top{n_randomised}-random", model, loaded.tokenizer, adapter,
                       f"{loaded.name} with its top {n_randomised} blocks re-initialised (seed {seed})", ident,
                       quantized=loaded.quantized, bos=list(loaded.bos), precision=loaded.precision)


def check_control(control) -> str:
    if control not in CONTROLS:
        raise ParameterError(f"control must be one of {CONTROLS} ('random-init': the same architecture with "
                             f"random weights, the default; 'none': no control), got {control!r}.")
    return control

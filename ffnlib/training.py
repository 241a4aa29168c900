"""Small causal LMs trained here, on the embedded corpus: ReLU vs softmax memories (Shen et al., 2023) and the
paper's kind of model (a plain ReLU FFN).

**What is trained.** A GPT-2-shaped transformer (learned positions, pre-LN, tied embeddings, no dropout) whose
FFN is one of :data:`VARIANTS`:

- ``relu``: ``ReLU(x·Kᵀ)·V``, the paper's FFN (GPT-2 config, ``activation_function="relu"``);
- ``gelu``: GPT-2's own (``"gelu_new"``);
- ``softmax``: ``softmax(x·Kᵀ)·V`` over the slots, the classic key-value memory;
- ``softmax_ln``: ``LN(softmax(x·Kᵀ)·V)``, Shen et al.'s fix;
- ``swiglu``: ``(SiLU(x·Gᵀ) ⊙ x·Kᵀ)·V``, as SmolLM2. transformers has no GPT-2 with a gated FFN, so this one is a
  Llama config of the same width, depth, heads and slots; it differs in more than the FFN (rotary positions,
  RMSNorm, a third matrix: 1.5x the FFN's weights at equal slots). Read its numbers with that in mind.

The two softmax variants are a GPT-2 config plus the field ``ffnlib_ffn`` (:mod:`ffnlib.ffn_variants`), which
``load_model`` re-applies. Every trained model is saved with ``save_pretrained`` beside its tokenizer and loads
with ``ffnlib.models.load_model(folder)`` into the existing adapters.

**Tokenizer.** A byte-level BPE of ``vocab_size`` tokens (4,096 by default) trained on the training split with the
`tokenizers` library, not the default model's 49,152-token vocabulary: with d_model = 128, that vocabulary's
embedding alone would be 6.3M weights, most of a small model, and its output softmax most of the compute. The
BPE is trained once per (corpus, size, vocabulary) and cached; training it is deterministic.

**Data.** The sentences of the training split, each followed by the end-of-text token, concatenated and cut into
blocks of ``context`` tokens. Every step reads ``batch`` blocks; epoch ``e`` visits the blocks in the order of a
permutation seeded by ``(seed, e)``, so the batch of any step is a function of the step alone. Held-out
perplexity is measured on the held-out split, cut the same way.

**The loop** (:func:`train_lm`): AdamW (weight decay on matrices only), linear warm-up then cosine decay
(torch's ``LinearLR`` and ``CosineAnnealingLR`` in ``SequentialLR``), gradient clipping, a tqdm bar with the loss
and tokens per second. A checkpoint (model, optimizer, schedule, step, history) is written atomically every
``checkpoint_every`` steps; a run that is interrupted and started again resumes from it and ends with weights
identical to an uninterrupted run (same threads). The checkpoint holds only tensors, state dicts, numbers, strings,
lists and dicts of those, and is read with ``torch.load(weights_only=True)``: a file that holds anything else (a
crafted pickle could run code when loaded) is refused with :class:`~ffnlib.errors.CheckpointError`, never loaded.
A finished run is cached under its spec's hash and loaded instead of retrained.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .errors import CheckpointError, ParameterError, ResultsError
from .nll import block_losses
from .progress import tqdm
from .storage import fingerprint

__all__ = ["VARIANTS", "EOT", "TrainSpec", "TrainResult", "train_tokenizer", "cached_tokenizer", "blocks",
           "batch_indices", "build_model", "spec_sentences", "make_optimizer", "CHECKPOINT_KEYS", "load_checkpoint",
           "after_step", "train_lm", "WIKI_RELU_LM", "TRAINED_MODELS", "trained_model_folder"]

VARIANTS = ("relu", "gelu", "swiglu", "softmax", "softmax_ln")
EOT = "<|endoftext|>"
_VERSION = 1  # bump when what a spec trains changes


@dataclass(frozen=True)
class TrainSpec:
    """Everything that decides a trained model (its hash names the run's folder)."""

    variant: str = "relu"
    slots: int = 512  # d_ff: the number of keys and values per layer
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    context: int = 128
    vocab_size: int = 4096
    tokens: int = 1_000_000  # the token budget: steps = tokens // (batch * context)
    batch: int = 16
    lr: float = 1e-3
    warmup: float = 0.05  # share of the steps
    weight_decay: float = 0.1
    clip: float = 1.0
    seed: int = 0
    corpus: str = "wiki"
    max_sentences: int | None = None  # None: the whole training split
    heldout_sentences: int = 2000  # perplexity is measured on the first ones of the held-out split

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ParameterError(f"variant must be one of {VARIANTS}, got {self.variant!r}.")
        for name in ("slots", "d_model", "n_layers", "n_heads", "context", "vocab_size", "tokens", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParameterError(f"{name} must be a positive int, got {value!r}.")
        if self.d_model % self.n_heads:
            raise ParameterError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads}).")
        if self.vocab_size < 300:
            raise ParameterError(f"vocab_size must be at least 300 (256 bytes plus merges), got {self.vocab_size}.")
        if self.corpus == "wiki+":
            raise ParameterError("corpus='wiki+' cannot be trained on: BIG-bench's canary asks that its data not be "
                                 "used to train models. Use corpus='wiki' (or your own text).")
        if not (self.lr > 0 and 0 <= self.warmup < 1 and self.weight_decay >= 0 and self.clip > 0):
            raise ParameterError("lr and clip must be positive, warmup in [0, 1), weight_decay >= 0.")

    @property
    def steps(self) -> int:
        return max(1, self.tokens // (self.batch * self.context))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def key(self) -> str:
        """The spec, this module's version and the versions of torch and transformers (their initialisers and
        kernels decide the weights): a change to any of them trains anew."""
        import transformers

        return fingerprint({"spec": self.as_dict(), "version": _VERSION, "torch": torch.__version__,
                            "transformers": transformers.__version__})

    def name(self) -> str:
        return f"{self.variant}-s{self.slots}-seed{self.seed}-{self.key()[:10]}"


@dataclass
class TrainResult:
    """A trained model's folder (``load_model(folder)`` reads it), its spec, the loss history and its held-out
    perplexity."""

    folder: Path
    spec: TrainSpec
    history: pd.DataFrame  # step, tokens, loss, lr
    heldout_loss: float  # mean over the held-out blocks (nats per token)
    heldout_block_losses: np.ndarray  # (n_blocks,), the same blocks for every spec of one corpus and tokenizer
    seconds: float  # training time of the run that produced it (resumed parts added up)
    tokens_per_second: float

    @property
    def heldout_perplexity(self) -> float:
        return float(math.exp(self.heldout_loss))


# ---- tokenizer and data ---------------------------------------------------------------------------------
def spec_sentences(spec: TrainSpec, split: str) -> list[str]:
    """The sentences of ``split`` ("train" or "heldout") that ``spec`` trains or measures on."""
    from .corpus import load_corpus

    table = load_corpus(spec.corpus, split=split, seed=0,
                        max_sentences=spec.max_sentences if split == "train" else spec.heldout_sentences)
    return table["text"].astype(str).tolist()


def train_tokenizer(texts: list[str], vocab_size: int, folder: Path):
    """A byte-level BPE trained on ``texts`` with the `tokenizers` library, saved in ``folder`` as a
    transformers tokenizer (``AutoTokenizer.from_pretrained(folder)`` reads it). Deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOT, bos_token=EOT, unk_token=EOT,
                                        pad_token=EOT)
    tokenizer.save_pretrained(folder)
    return tokenizer


def cached_tokenizer(spec: TrainSpec, out_dir: Path):
    from transformers import AutoTokenizer

    key = fingerprint({"corpus": spec.corpus, "max_sentences": spec.max_sentences, "vocab": spec.vocab_size,
                       "version": _VERSION})
    folder = Path(out_dir) / f"tokenizer-{key[:12]}"
    if not (folder / "tokenizer.json").exists():
        tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".tokenizer."))
        try:
            train_tokenizer(spec_sentences(spec, "train"), spec.vocab_size, tmp)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(folder)


def blocks(tokenizer, texts: list[str], context: int) -> torch.Tensor:
    """The texts, each followed by the end-of-text token, concatenated and cut into (n, context) blocks."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eot = tokenizer.convert_tokens_to_ids(EOT)
    stream = np.fromiter((t for sentence in ids for t in (*sentence, eot)), dtype=np.int64)
    n = len(stream) // context
    if n == 0:
        raise ParameterError(f"The corpus gives {len(stream)} tokens, fewer than one block of {context}.")
    return torch.from_numpy(stream[: n * context].reshape(n, context))


def batch_indices(step: int, n_blocks: int, batch: int, seed: int) -> np.ndarray:
    """The blocks read at ``step``: epoch after epoch, each in the order of a permutation seeded by (seed, epoch)."""
    start = step * batch
    out = []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n_blocks)
        order = np.random.default_rng([seed, epoch]).permutation(n_blocks)
        out.extend(order[offset: offset + batch - len(out)].tolist())
    return np.asarray(out)


# ---- the model ------------------------------------------------------------------------------------------
def build_model(spec: TrainSpec, tokenizer):
    """A randomly initialised (seeded) model of ``spec``, from transformers' own classes."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from .ffn_variants import CONFIG_FIELD, apply_ffn_variant

    torch.manual_seed(spec.seed)
    vocab = len(tokenizer)
    eot = tokenizer.convert_tokens_to_ids(EOT)
    if spec.variant == "swiglu":
        config = LlamaConfig(vocab_size=vocab, hidden_size=spec.d_model, intermediate_size=spec.slots,
                             num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads,
                             num_key_value_heads=spec.n_heads, max_position_embeddings=spec.context,
                             hidden_act="silu", tie_word_embeddings=True, bos_token_id=eot, eos_token_id=eot,
                             pad_token_id=eot)
        return LlamaForCausalLM(config)
    config = GPT2Config(vocab_size=vocab, n_positions=spec.context, n_embd=spec.d_model, n_layer=spec.n_layers,
                        n_head=spec.n_heads, n_inner=spec.slots,
                        activation_function="gelu_new" if spec.variant == "gelu" else "relu",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eot, eos_token_id=eot,
                        pad_token_id=eot, tie_word_embeddings=True)
    if spec.variant in ("softmax", "softmax_ln"):
        setattr(config, CONFIG_FIELD, spec.variant)
    return apply_ffn_variant(GPT2LMHeadModel(config))


def make_optimizer(model, spec: TrainSpec):
    """AdamW (weight decay on matrices only) and its warm-up then cosine schedule, as ``spec`` sets them."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=spec.lr, betas=(0.9, 0.95))
    warm = max(1, int(round(spec.warmup * spec.steps)))
    warm = min(warm, spec.steps)
    schedule = torch.optim.lr_scheduler.SequentialLR(
        optimizer, [torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / warm, total_iters=warm),
                    torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, spec.steps - warm - 1),
                                                               eta_min=spec.lr / 10)],
        milestones=[warm])
    return optimizer, schedule


def after_step(step: int) -> None:
    """Called after every optimizer step (tests replace it to interrupt a run)."""


def _save_atomic(folder: Path, write) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        write(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


CHECKPOINT_KEYS = ("key", "model", "optimizer", "schedule", "step", "history", "seconds")


def load_checkpoint(path: Path) -> dict:
    """A training checkpoint read with ``weights_only=True`` (tensors, state dicts, numbers, strings, lists and
    dicts only), so that a crafted file cannot run code; anything else is a :class:`CheckpointError` that says
    how to recover (delete it: the run starts again from step 0)."""
    recover = (f"It is refused, not loaded. Delete it (rm '{path}') and run again: training starts over from step 0. "
               "If ffnlib did not write it, check who else can write to that folder.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's own lines say why; its advice (weights_only=False) is left out
        why = " ".join(line.strip() for line in str(exc).splitlines()[1:] if line.strip() and not line.startswith(
            ("Check the documentation", "Please file an issue"))) or type(exc).__name__
        raise CheckpointError(f"The training checkpoint {path} is not a plain checkpoint: it holds objects other "
                              f"than tensors, numbers, strings, lists and dicts, which could run code when loaded "
                              f"({why[:200]}). {recover}") from exc
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CheckpointError(f"The training checkpoint {path} cannot be read as a checkpoint ({exc}). "
                              f"{recover}") from exc
    if not isinstance(state, dict) or any(k not in state for k in CHECKPOINT_KEYS):
        raise CheckpointError(f"The training checkpoint {path} is not a plain checkpoint: it lacks "
                              f"{[k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]}. "
                              f"{recover}")
    return state


def _load_result(folder: Path) -> TrainResult | None:
    meta = folder / "ffnlib-trained.json"
    if not meta.exists():
        return None
    info = json.loads(meta.read_text())
    return TrainResult(folder, TrainSpec(**info["spec"]), pd.DataFrame(info["history"]), info["heldout_loss"],
                       np.asarray(info["heldout_block_losses"]), info["seconds"], info["tokens_per_second"])


def train_lm(spec: TrainSpec, out_dir, progress: bool = True, checkpoint_every: int = 200,
             precision: str = "float32") -> TrainResult:
    """Train (or load the cached result of) the model of ``spec`` under ``out_dir``/<spec name>/.

    ``precision="bfloat16"`` trains under CPU autocast (the weights, the optimizer and the held-out losses stay
    float32); such a run has its own folder, ``<spec name>-bfloat16``. Resumes from the run's checkpoint when one
    is there; see the module docstring for the loop."""
    from .precision import resolve_precision

    chosen = resolve_precision(precision, "cpu")  # training runs on the CPU
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_name = spec.name() if chosen.name == "float32" else f"{spec.name()}-{chosen.name}"
    folder = out_dir / run_name
    cached = _load_result(folder)
    if cached is not None:
        return cached
    tokenizer = cached_tokenizer(spec, out_dir)
    train, heldout = (blocks(tokenizer, spec_sentences(spec, split), spec.context) for split in ("train", "heldout"))
    model = build_model(spec, tokenizer)
    optimizer, schedule = make_optimizer(model, spec)
    checkpoint = out_dir / f".{run_name}.checkpoint.pt"
    step, history, seconds = 0, [], 0.0
    if checkpoint.exists():
        state = load_checkpoint(checkpoint)
        if state["key"] != spec.key():
            raise ResultsError(f"The checkpoint {checkpoint} belongs to another spec; delete it to start again.")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, history, seconds = state["step"], state["history"], state["seconds"]
        print(f"[ffnlib] resuming {spec.name()} at step {step} of {spec.steps}")
    tokens_per_step = spec.batch * spec.context
    model.train()
    bar = tqdm(total=spec.steps, initial=step, desc=f"training {spec.variant}, {spec.slots} slots",
               unit="step", disable=not progress)
    started = time.perf_counter()
    try:
        while step < spec.steps:
            ids = train[torch.from_numpy(batch_indices(step, len(train), spec.batch, spec.seed))]
            with torch.autocast("cpu", dtype=chosen.dtype, enabled=chosen.name != "float32"):
                loss = model(ids, attention_mask=torch.ones_like(ids), labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            history.append({"step": step, "tokens": (step + 1) * tokens_per_step, "loss": loss.item(),
                            "lr": float(schedule.get_last_lr()[0])})
            schedule.step()
            step += 1
            elapsed = seconds + time.perf_counter() - started
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", tok_s=f"{(step * tokens_per_step) / max(elapsed, 1e-9):,.0f}")
            if step % checkpoint_every == 0 and step < spec.steps:
                # plain types only (weights_only=True reads them back): no RNG state is needed, since the batch
                # of a step is a function of the step and the model has no dropout
                state = {"key": spec.key(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "schedule": schedule.state_dict(), "step": step, "history": history, "seconds": elapsed}
                torch.save(state, checkpoint.with_suffix(".tmp"))
                os.replace(checkpoint.with_suffix(".tmp"), checkpoint)
            after_step(step)
    finally:
        bar.close()
    seconds += time.perf_counter() - started
    per_block = block_losses(model, heldout)
    info = {"spec": spec.as_dict(), "history": history, "heldout_loss": float(per_block.mean()),
            "heldout_block_losses": per_block.tolist(), "seconds": seconds,
            "tokens_per_second": spec.steps * tokens_per_step / max(seconds, 1e-9), "version": _VERSION}
    if chosen.name != "float32":  # float32 runs' records stay as they were
        info["precision"] = chosen.name

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "ffnlib-trained.json").write_text(json.dumps(info))

    _save_atomic(folder, write)
    checkpoint.unlink(missing_ok=True)
    return _load_result(folder)


# ---- the paper's kind of model, trained here: an embedded name -------------------------------------------------
# The largest plain-ReLU model that trains in about 30 minutes on 2 CPU cores (benchmarks/bench_training.py measures
# the time): GPT-2-shaped, ReLU FFN, on the embedded corpus's training split.
WIKI_RELU_LM = TrainSpec(variant="relu", slots=1024, d_model=256, n_layers=6, n_heads=8, context=128,
                         vocab_size=8192, tokens=3_000_000, batch=16, lr=1e-3)
TRAINED_MODELS: dict[str, TrainSpec] = {"wiki-relu-lm": WIKI_RELU_LM}


def trained_model_folder(name: str, progress: bool = True) -> Path:
    """The folder of an embedded trained model (``wiki-relu-lm``): trained on first use, under
    ``<cache>/trained/`` (``$FFNLIB_CACHE`` or ``~/.cache/ffnlib``), resumable, then loaded from there."""
    from .storage import cache_dir

    spec = TRAINED_MODELS[name]
    out = cache_dir() / "trained"
    if not _load_result(out / spec.name()) and progress:
        print(f"[ffnlib] {name} is not trained yet on this machine: training it once ({spec.n_layers} layers, "
              f"d_model {spec.d_model}, {spec.slots} ReLU memories per layer, {spec.tokens:,} tokens of the "
              f"embedded corpus); an interrupted run resumes. Cached in {out}.")
    return train_lm(spec, out, progress=progress).folder

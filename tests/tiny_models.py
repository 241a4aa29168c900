"""Tiny random models of every family in ``ffnlib.adapters.FAMILIES``, shared by the tests.

``CASES`` has one :class:`Case` per model type that maps to a family (17 of them, for 12 families);
``build_config(case, vocab, positions)`` gives its config with another vocabulary size or context length
(e.g. a real tokenizer's vocabulary). Adding a family: add a ``Case`` (see docs/adding-a-family.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import transformers as tf

VOCAB = 101
D_MODEL = 32
BATCH, TOKENS = 2, 7
TOKEN_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # inside the tiny vocabulary


# ---- the tiny models -----------------------------------------------------------------------------
def _llama_like(config_cls, **extra):
    return config_cls(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      **TOKEN_IDS, **extra)


def _gemma3_multimodal():
    text = dict(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                max_position_embeddings=64, **TOKEN_IDS)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=16, patch_size=8)
    return tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=100,
                           boi_token_index=98, eoi_token_index=99)


@dataclass(frozen=True)
class Case:
    id: str
    family: str  # expected FamilySpec.name
    config: Callable[[], tf.PretrainedConfig]
    model_cls: type
    activation: Callable[[tf.PretrainedConfig], str]  # the FFN activation, as the model's config names it
    d_ff: int
    norm: str  # final norm: "layernorm", "layernorm_no_weight", "rmsnorm" or "gemma_rmsnorm" (x * (1 + w))
    residual: str  # "ffn_norm": sequential block, "raw": the FFN reads the raw residual, else the attention path
    conv1d: bool = False


CASES = [
    Case("gpt2", "gpt2", lambda: tf.GPT2Config(n_layer=2, n_embd=D_MODEL, n_head=4, n_inner=80, n_positions=64,
                                                vocab_size=VOCAB, **TOKEN_IDS),
         tf.GPT2LMHeadModel, lambda c: c.activation_function, 80, "layernorm", "ffn_norm", conv1d=True),
    Case("gpt-neo", "gpt-neo",
         lambda: tf.GPTNeoConfig(num_layers=2, hidden_size=D_MODEL, num_heads=4, intermediate_size=72,
                                 attention_types=[[["global", "local"], 1]], window_size=4,
                                 max_position_embeddings=64, vocab_size=VOCAB, **TOKEN_IDS),
         tf.GPTNeoForCausalLM, lambda c: c.activation_function, 72, "layernorm", "ffn_norm"),
    Case("gpt-j", "gpt-j", lambda: tf.GPTJConfig(n_layer=2, n_embd=D_MODEL, n_head=4, rotary_dim=4, n_inner=56,
                                                  n_positions=64, vocab_size=VOCAB, **TOKEN_IDS),
         tf.GPTJForCausalLM, lambda c: c.activation_function, 56, "layernorm", "attn"),
    Case("gpt-neox-parallel", "gpt-neox",
         lambda: tf.GPTNeoXConfig(num_hidden_layers=2, hidden_size=D_MODEL, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, vocab_size=VOCAB,
                                  use_parallel_residual=True, **TOKEN_IDS),
         tf.GPTNeoXForCausalLM, lambda c: c.hidden_act, 64, "layernorm", "attention"),
    Case("gpt-neox-sequential", "gpt-neox",
         lambda: tf.GPTNeoXConfig(num_hidden_layers=2, hidden_size=D_MODEL, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, vocab_size=VOCAB,
                                  use_parallel_residual=False, **TOKEN_IDS),
         tf.GPTNeoXForCausalLM, lambda c: c.hidden_act, 64, "layernorm", "ffn_norm"),
    Case("opt", "opt", lambda: tf.OPTConfig(num_hidden_layers=2, hidden_size=D_MODEL, num_attention_heads=4,
                                             ffn_dim=88, word_embed_proj_dim=D_MODEL, max_position_embeddings=64,
                                             vocab_size=VOCAB, **TOKEN_IDS),
         tf.OPTForCausalLM, lambda c: c.activation_function, 88, "layernorm", "ffn_norm"),
    # BloomConfig names no activation: BloomGelu is the tanh approximation of GELU
    Case("bloom", "bloom", lambda: tf.BloomConfig(n_layer=2, hidden_size=D_MODEL, n_head=4, vocab_size=VOCAB,
                                                   **TOKEN_IDS),
         tf.BloomForCausalLM, lambda c: "gelu_pytorch_tanh", 4 * D_MODEL, "layernorm", "ffn_norm"),
    Case("llama", "llama", lambda: _llama_like(tf.LlamaConfig), tf.LlamaForCausalLM,
         lambda c: c.hidden_act, 48, "rmsnorm", "ffn_norm"),
    Case("mistral", "llama", lambda: _llama_like(tf.MistralConfig), tf.MistralForCausalLM,
         lambda c: c.hidden_act, 48, "rmsnorm", "ffn_norm"),
    Case("qwen2", "llama", lambda: _llama_like(tf.Qwen2Config), tf.Qwen2ForCausalLM,
         lambda c: c.hidden_act, 48, "rmsnorm", "ffn_norm"),
    Case("qwen3", "llama", lambda: _llama_like(tf.Qwen3Config, head_dim=8), tf.Qwen3ForCausalLM,
         lambda c: c.hidden_act, 48, "rmsnorm", "ffn_norm"),
    Case("olmo", "llama", lambda: _llama_like(tf.OlmoConfig), tf.OlmoForCausalLM,
         lambda c: c.hidden_act, 48, "layernorm_no_weight", "ffn_norm"),
    Case("olmo2", "olmo2", lambda: _llama_like(tf.Olmo2Config), tf.Olmo2ForCausalLM,
         lambda c: c.hidden_act, 48, "rmsnorm", "raw"),
    Case("gemma", "gemma", lambda: _llama_like(tf.GemmaConfig, head_dim=8), tf.GemmaForCausalLM,
         lambda c: c.hidden_act, 48, "gemma_rmsnorm", "ffn_norm"),
    Case("gemma2", "gemma2", lambda: _llama_like(tf.Gemma2Config, head_dim=8, sliding_window=4),
         tf.Gemma2ForCausalLM, lambda c: c.hidden_activation, 48, "gemma_rmsnorm", "ffn_norm"),
    Case("gemma3_text", "gemma2", lambda: _llama_like(tf.Gemma3TextConfig, head_dim=8, sliding_window=4),
         tf.Gemma3ForCausalLM, lambda c: c.hidden_activation, 48, "gemma_rmsnorm", "ffn_norm"),
    Case("gemma3", "gemma3", _gemma3_multimodal, tf.Gemma3ForConditionalGeneration,
         lambda c: c.text_config.hidden_activation, 48, "gemma_rmsnorm", "ffn_norm"),
]
CASE_IDS = [case.id for case in CASES]


def make_tokenizer() -> tf.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "a": 3, **{f"w{i}": i for i in range(4, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", bos_token="<s>",
                                      eos_token="</s>")


def build_config(case: Case, vocab: int | None = None, positions: int | None = None) -> tf.PretrainedConfig:
    """The case's config, with ``vocab`` tokens and room for ``positions`` tokens if given."""
    config = case.config()
    text = getattr(config, "text_config", None) or config  # Gemma 3 multimodal keeps the LM's sizes inside
    if vocab is not None:
        text.vocab_size = vocab
    if positions is not None:
        for name in ("max_position_embeddings", "n_positions"):
            if hasattr(text, name):
                setattr(text, name, positions)
    return config


def perturbed_model(case: Case) -> "torch.nn.Module":
    """The case's 2-layer model, with its 1-D parameters (norm gains, biases) perturbed so that they matter."""
    torch.manual_seed(0)
    model = case.model_cls(case.config()).float().eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.2 * torch.randn_like(param))
    return model

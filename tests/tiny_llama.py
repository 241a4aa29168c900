"""The tiny random Llama of the Section 3 tests (tests/test_mining.py, tests/test_keys.py), on SmolLM2's tokenizer.

``tiny_llama()`` builds it, ``wrap(model, tokenizer)`` makes it a :class:`ffnlib.models.LoadedModel`, and
``mine(loaded, sentences)`` mines its trigger examples with small sizes (k=5, 160-token batches).
"""

from __future__ import annotations

import torch
import transformers as tf

from ffnlib import keys
from ffnlib.adapters import get_adapter
from ffnlib.models import LoadedModel

VOCAB = 49152  # SmolLM2's tokenizer


def tiny_llama(seed: int = 0, layers: int = 3, d_ff: int = 24) -> tf.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=d_ff, num_hidden_layers=layers,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                            bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    model = tf.LlamaForCausalLM(config).eval().requires_grad_(False)
    with torch.no_grad():  # a random init is nearly flat; widen it so the tops are well separated
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def wrap(model, tokenizer, name="tiny-llama", bos=()) -> LoadedModel:
    return LoadedModel(name, model, tokenizer, get_adapter(model), "random init", f"{name}-hash", False, list(bos))


def mine(loaded, sentences, **kw):
    kw = {"k": 5, "batch_tokens": 160, "progress": False, **kw}
    return keys.mine_trigger_examples(loaded, sentences, **kw)

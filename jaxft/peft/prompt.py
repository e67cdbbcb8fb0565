"""Prompt tuning (Lester et al. 2021) on jaxft models, numerically the same as Hugging Face PEFT.

    apply_prompt_tuning(model, PromptConfig(num_virtual_tokens=20, init="TEXT", init_text="Answer:"), tokenizer)

N trained input embeddings [N, D] are prepended to every sequence (jaxft.models.virtual): they pass
through every layer like tokens at positions 0..N-1 and their outputs are dropped, so logits stay
[B, T, V]. PEFT's PromptEmbedding (peft/tuners/prompt_tuning/model.py) and its initializations:
    RANDOM        torch.nn.Embedding's N(0, 1)
    TEXT          the word embeddings of tokenizer(init_text) (special tokens included, as PEFT),
                  cut to N tokens or repeated until N
    SAMPLE_VOCAB  the word embeddings of N ids drawn uniformly from the vocabulary
The embeddings enter after Gemma's √hidden scale (transformers 5 applies it inside the embedding
module, so PEFT's inputs_embeds are not scaled again), and TEXT / SAMPLE_VOCAB start from scaled rows.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.peft.lora import LoRAParam

INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")  # PEFT's PromptTuningInit values


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    num_virtual_tokens: int
    init: str = "RANDOM"  # one of INITS (any case)
    init_text: str | None = None  # init=TEXT: the text whose token embeddings start the prompt

    def __post_init__(self):
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        init = str(self.init).upper()
        if init not in INITS:
            raise ValueError(f"prompt_tuning_init {self.init!r} is not one of {INITS}")
        object.__setattr__(self, "init", init)
        if init == "TEXT" and not self.init_text:
            raise ValueError("prompt_tuning_init=TEXT needs prompt_tuning_init_text (the text to start from)")


class PromptEmbedding(nnx.Module):
    """The trained prompt; `embeddings(dtype)` gives it as [N, D]."""

    kind = "prompt"

    def __init__(self, values: jnp.ndarray):
        self.num_virtual_tokens = int(values.shape[0])
        self.embedding = LoRAParam(values.astype(jnp.float32), axes=(None, None))  # [N, D], PEFT's embedding.weight

    def embeddings(self, dtype) -> jnp.ndarray:
        return self.embedding[...].astype(dtype)


def init_token_ids(config: PromptConfig, tokenizer) -> list[int]:
    """PEFT's TEXT init ids: the text's tokens (with the tokenizer's special tokens), cut or repeated to N."""
    ids = list(tokenizer(config.init_text)["input_ids"])
    if not ids:
        raise ValueError(f"prompt_tuning_init_text {config.init_text!r} has no tokens")
    n = config.num_virtual_tokens
    return (ids * math.ceil(n / len(ids)))[:n]


def apply_prompt_tuning(model: nnx.Module, config: PromptConfig, tokenizer=None, seed: int = 0) -> nnx.Module:
    """Sets a trained prompt on `model`'s decoder, in place; returns the model. `tokenizer`: for init=TEXT."""
    decoder = model.model
    if decoder.virtual is not None:
        raise ValueError(f"the model already has virtual tokens ({type(decoder.virtual).__name__})")
    n, table = config.num_virtual_tokens, decoder.embed_tokens.weight
    key = jax.random.key(seed)
    if config.init == "RANDOM":
        values = jax.random.normal(key, (n, table.shape[-1]), jnp.float32)
    else:
        if config.init == "TEXT":
            if tokenizer is None:
                raise ValueError("prompt_tuning_init=TEXT needs the tokenizer")
            ids = jnp.asarray(init_token_ids(config, tokenizer), jnp.int32)
        else:
            ids = jax.random.randint(key, (n,), 0, table.shape[0])
        # The word embeddings as the model's embedding module returns them: with Gemma's √hidden scale
        # (transformers 5 scales inside the module, and PEFT's init reads that output).
        values = decoder.scale_embeddings(jnp.take(table[...], ids, axis=0).astype(decoder.dtype)).astype(jnp.float32)
    decoder.virtual = PromptEmbedding(values)
    return model


__all__ = ["INITS", "PromptConfig", "PromptEmbedding", "apply_prompt_tuning", "init_token_ids"]

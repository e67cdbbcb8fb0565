"""`peft.method`: which adapter a run trains, from its config (the one place that reads peft.*).

    lora           lora.* (lora.rank = 0: full fine-tuning)           jaxft.peft.lora
    prefix_tuning  peft.num_virtual_tokens, prefix_projection, encoder_hidden_size   jaxft.peft.prefix
    prompt_tuning  peft.num_virtual_tokens, prompt_tuning_init(_text)  jaxft.peft.prompt
    ia3            PEFT's default target / feed-forward modules          jaxft.peft.ia3
Every method's parameters are LoRAParam, so `jaxft.peft.lora.is_lora_param` is what trains for all.
Works on ConfigDicts and the plain config dicts saved in checkpoints alike (older runs: lora).
"""

from __future__ import annotations

METHODS = ("lora", "prefix_tuning", "prompt_tuning", "ia3")
VIRTUAL = ("prefix_tuning", "prompt_tuning")  # cannot be merged into weights
PEFT_TYPES = {"lora": "LORA", "prefix_tuning": "PREFIX_TUNING", "prompt_tuning": "PROMPT_TUNING", "ia3": "IA3"}


def _get(config, key: str, default=None):
    node = config
    for part in key.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError):
            return default
    return node


def method(config) -> str:
    """The run's peft.method ("lora" for configs that predate it)."""
    return _get(config, "peft.method", "lora") or "lora"


def is_adapter_run(config) -> bool:
    """Only adapters train (the base is frozen): any method but LoRA with rank 0 (full fine-tuning)."""
    return method(config) != "lora" or bool(_get(config, "lora.rank", 0))


def settings(config):
    """The method's settings object (PrefixConfig | PromptConfig | IA3 None = the family's defaults),
    checked; None for lora. Errors name the config keys."""
    name = method(config)
    if name not in METHODS:
        raise ValueError(f"peft.method {name!r} is not one of {METHODS}")
    n = _get(config, "peft.num_virtual_tokens")
    try:
        if name == "prefix_tuning":
            from jaxft.peft.prefix import PrefixConfig

            return PrefixConfig(n, prefix_projection=bool(_get(config, "peft.prefix_projection", False)),
                                encoder_hidden_size=_get(config, "peft.encoder_hidden_size"))
        if name == "prompt_tuning":
            from jaxft.peft.prompt import PromptConfig

            return PromptConfig(n, init=_get(config, "peft.prompt_tuning_init", "RANDOM"),
                                init_text=_get(config, "peft.prompt_tuning_init_text"))
    except ValueError as e:
        raise ValueError(f"peft.{e}") from None
    return None


def apply(model, config, seed: int = 0, abstract: bool = False):
    """Attaches the method's adapter (not lora: jaxft.run does that) to `model`; returns the model.
    abstract (shapes only, jaxft plan): a TEXT prompt init needs no tokenizer."""
    name, chosen = method(config), settings(config)
    if name == "prefix_tuning":
        from jaxft.peft.prefix import apply_prefix_tuning

        return apply_prefix_tuning(model, chosen, seed=seed)
    if name == "prompt_tuning":
        import dataclasses

        from jaxft.peft.prompt import apply_prompt_tuning

        tokenizer = None
        if chosen.init == "TEXT" and abstract:
            chosen = dataclasses.replace(chosen, init="RANDOM", init_text=None)
        elif chosen.init == "TEXT":
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(_get(config, "model.path"),
                                                      revision=_get(config, "model.revision"))
        return apply_prompt_tuning(model, chosen, tokenizer, seed=seed)
    if name == "ia3":
        from jaxft.peft.ia3 import apply_ia3

        return apply_ia3(model)
    raise ValueError(f"peft.method {name!r} has no adapter to apply here")


def virtual_tokens(config) -> int:
    """The key/value length prefix or prompt tuning adds before every sequence (0 for the others)."""
    return int(_get(config, "peft.num_virtual_tokens", 0)) if method(config) in VIRTUAL else 0


__all__ = ["METHODS", "PEFT_TYPES", "VIRTUAL", "apply", "is_adapter_run", "method", "settings", "virtual_tokens"]

"""jaxft: fine-tune open LLMs in JAX, with parity to transformers and export back to PyTorch.

    import jaxft
    model = jaxft.from_pretrained("path/or/org-name", dtype="bfloat16")
    logits = model(input_ids, attention_mask=mask)   # [B, T, V]
    jaxft.save_pretrained(model, "out/")            # loads with transformers
"""

__version__ = "0.1.0.dev0"


def __getattr__(name):
    # Lazy, so `import jaxft` (e.g. for the CLI's --help) does not pay for importing jax.
    if name in ("from_pretrained", "save_pretrained", "init_random"):
        from jaxft import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module 'jaxft' has no attribute {name!r}")


__all__ = ["from_pretrained", "save_pretrained", "init_random", "__version__"]

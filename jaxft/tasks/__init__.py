"""Training tasks beyond causal language modelling, built on jaxft.step (see each module's docstring)."""

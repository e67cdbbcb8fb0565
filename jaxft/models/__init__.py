"""Model families. `registry.family_for(model_type)` picks one from an HF config's `model_type`."""

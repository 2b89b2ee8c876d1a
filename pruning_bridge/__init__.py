"""pruning_bridge: TransformerLens hook names on Hugging Face models, and model compression."""

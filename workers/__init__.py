"""What runs inside an actor: models, saliency methods, metrics. Usable without Ray."""

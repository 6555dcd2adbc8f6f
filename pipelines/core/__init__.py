"""Domain-neutral core: adapters, training, evaluation, recipes and data."""

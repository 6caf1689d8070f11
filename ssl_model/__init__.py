"""The PyTorch side: model, data loader over token shards, trainer, checkpoints.

Imports neither Prefect nor MLflow: the trainer reports through a callback, so it runs the
same under torchrun, in a notebook, or inside the flow.
"""

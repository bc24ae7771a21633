"""Drafter training by self-distillation (`specmtp train-drafter`)."""

from specmtp.training.trainer import TrainOptions, train_drafter

__all__ = ["TrainOptions", "train_drafter"]

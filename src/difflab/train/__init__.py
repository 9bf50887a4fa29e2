"""Training: the loop, EMA and checkpoints."""
from difflab.train.loop import Trainer

__all__ = ["Trainer"]

"""shraygpt-rl: RLHF for the course's ShrayGPT, built on PyTorch Lightning."""

from shraygpt_rl.layers import KVCache
from shraygpt_rl.model import ShrayGPT

__all__ = ["KVCache", "ShrayGPT"]
__version__ = "0.1.0"

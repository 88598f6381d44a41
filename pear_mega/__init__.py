"""pear-mega: PEAR importance-reweighted SFT and colocated RL on megatron-core."""

__version__ = "0.1.0"

"""PEAR-SFT: configuration, named recipes and the megatron-core trainer."""

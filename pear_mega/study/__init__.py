"""Studies: is a PEAR-SFT checkpoint a better start for identical RL than a plain-SFT one?"""

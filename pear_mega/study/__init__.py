"""PEAR studies: behavior data → SFT arms → identical GRPO → pass@k, with seeds and diagnostics.

``python -m pear_mega.study --recipe NAME``; see ``pear_mega.study.stages`` for the stages and
``pear_mega.study.config`` for the settings. Nothing is imported here (the entry point stays fast).
"""

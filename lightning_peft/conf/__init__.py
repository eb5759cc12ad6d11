"""Hydra configs of lightning_peft (the top-level conf/ links here); a package so pkg:// finds it."""

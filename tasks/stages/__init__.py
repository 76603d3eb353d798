"""The pipeline's stages: one package each, one public entry `fn(cfg, run_dir) -> dict`.

Stages import core and plumbing, never each other and never a runner (import-linter holds it).
"""

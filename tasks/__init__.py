"""qa-lora: the pipeline's stages as plain, importable Python (no Airflow or DVC inside)."""

__version__ = "0.1.0"

"""The export stage: `export_model(cfg, run_dir)` (stage.py reads top to bottom; its steps live beside it).

stage.py      the entry: inputs, gate, runtime and provider, then merge -> ONNX -> parity -> card
inputs.py     inputs, fingerprint and reuse, the returned result
memory.py     the memory plan (refuse a machine too small; merge on GPU or CPU)
merge.py      the merge and the PyTorch side of every parity check
onnx_graph.py the ONNX graph with a KV cache, its layout file, ONNX Runtime parity
variants.py   optional fp16 / int8 graphs, checked against fp32
card.py       the model card
"""

from tasks.stages.export.card import render_model_card
from tasks.stages.export.memory import load_base_config, plan_memory
from tasks.stages.export.merge import ExportParityError, generation_config, merge_adapter
from tasks.stages.export.stage import export_model

__all__ = [
    "ExportParityError",
    "export_model",
    "generation_config",
    "load_base_config",
    "merge_adapter",
    "plan_memory",
    "render_model_card",
]

"""Compress: a trained model made into a small deployable file.

    export.py         the ONNX file (export_onnx, check_onnx, onnx_latency_ms, size_kb)
    quantize.py       post-training INT8 (quantize_int8)
    channel_prune.py  structured pruning: whole channels removed (prune_model, pruned_size)
    qat.py            quantization-aware training (qat_int8, check_quantizable)
    qdq_graph.py      onnxruntime's INT8 QDQ graph run in PyTorch (FakeQuantGraph)
"""

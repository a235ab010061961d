"""ONNX export, checked with onnxruntime: one self-contained file of known size and speed.

    size_bytes = export_onnx(model, 'saved.onnx', in_channels=1, input_size=1250, opset=18)
    check_onnx('saved.onnx', model, sample)     # onnxruntime output == PyTorch output
    latency_ms = onnx_latency_ms('saved.onnx')  # median per segment, batch 1, 1 thread
    probe = like_trained(model)                 # distinct values: exports at the trained size

The exporter is torch's TorchScript-based one (dynamo=False): on these small convnets it
writes the same graph as the dynamo exporter in a fraction of the time, needs no
onnxscript, and always embeds the weights (no `.onnx.data` side file). The input keeps the
original layout [N, C, L, 1] with a dynamic batch axis.
"""
import contextlib
import copy
import io
import os
import time
import warnings

import numpy as np
import onnxruntime as ort
import torch

from public.core.atomic import replacing
from public.core.errors import ExportError


def export_onnx(model, path, in_channels, input_size, opset):
    """Export model (eval mode, CPU copy) to `path`; return the file's size in bytes."""
    was_training = model.training
    device = next(model.parameters()).device
    model = model.cpu().eval()
    dummy = torch.zeros(1, in_channels, input_size, 1)
    try:
        # A full disk stays the exporter's own error: the trial records it as it is.
        with replacing(path, name_full_disk=False) as tmp:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter('ignore')
                torch.onnx.export(model, (dummy,), tmp, dynamo=False, opset_version=opset,
                                  input_names=['input'], output_names=['output'],
                                  dynamic_axes={'input': {0: 'batch'}, 'output': {0: 'batch'}},
                                  do_constant_folding=True)
            if any(f.startswith(os.path.basename(tmp)) and f != os.path.basename(tmp)
                   for f in os.listdir(os.path.dirname(os.path.abspath(tmp)))):
                raise ExportError(f"{path}: exporter wrote weights to a side file; ATML needs "
                                  f"one self-contained file")
    finally:
        model.to(device).train(was_training)
    return os.path.getsize(path)


def like_trained(model, seed=0):
    """Give every parameter and float buffer distinct random values, as training does.

    The ONNX exporter stores identical initializers once: an untrained model's BatchNorm
    tensors (all ones / all zeros) would share storage and export ~1 % smaller than the
    same model after training. With distinct values the probe's size is the trained size."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
    return model


def _session(path, threads=1):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def onnx_predict(path, x, batch_size=1024):
    """Logits of the ONNX model at path on x ((N, C, L) array), via onnxruntime."""
    session = _session(path, threads=0)
    name = session.get_inputs()[0].name
    x = np.asarray(x, dtype=np.float32)[..., None]
    return np.concatenate([session.run(None, {name: x[i:i + batch_size]})[0]
                           for i in range(0, len(x), batch_size)])


@torch.inference_mode()
def check_onnx(path, model, sample, atol=1e-4, rtol=1e-3):
    """onnxruntime's logits on sample ((N, C, L) array) must match PyTorch's; else ExportError.

    The reference is the model's float32 copy on the CPU: the exported graph is what the
    CPU runs. (On a GPU, PyTorch's convolutions may use TF32, up to ~1e-3 away from the
    float32 result the ONNX file computes: that is not an export error.)"""
    reference = copy.deepcopy(model).cpu().float().eval()
    with torch.no_grad():
        expected = reference(torch.as_tensor(np.asarray(sample, np.float32)).unsqueeze(-1)
                             ).numpy()
    got = onnx_predict(path, sample)
    if got.shape != expected.shape or not np.allclose(got, expected, atol=atol, rtol=rtol):
        diff = np.max(np.abs(got - expected)) if got.shape == expected.shape else 'shape'
        raise ExportError(f"{path}: onnxruntime output differs from PyTorch "
                          f"(max abs diff {diff}, tolerance {atol})")
    return float(np.max(np.abs(got - expected)))


def onnx_latency_ms(path, runs=200, warmup=10):
    """Median onnxruntime latency of one segment (batch 1, one thread), in milliseconds."""
    session = _session(path, threads=1)
    inp = session.get_inputs()[0]
    shape = [1] + [d if isinstance(d, int) else 1 for d in inp.shape[1:]]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for _ in range(warmup):
        session.run(None, {inp.name: x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {inp.name: x})
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def size_kb(size_bytes):
    """File size in KB (1024 bytes), rounded up: the figure written as 'ONNX file size: N KB'."""
    return -(-size_bytes // 1024)

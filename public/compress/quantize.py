"""INT8 post-training static quantization of an exported ONNX model (onnxruntime).

    int8_bytes = quantize_int8('saved.onnx', 'saved.int8.onnx', calibration_x,
                               reduce_range=True)

Calibration runs real training segments through the float model to fix activation
ranges; weights become int8 (per channel), activations uint8, in QDQ format, which every
onnxruntime execution provider runs. For models this small the QuantizeLinear /
DequantizeLinear nodes and their scales are a visible share of the file, so ATML measures
the INT8 file rather than assuming it is 4x smaller (README, Stage two figures).

reduce_range (INT8_REDUCE_RANGE, the default): weights use 7 bits ([-64, 64], onnxruntime's
reduce_range). On x86 CPUs without VNNI, onnxruntime's u8s8 kernels add pairs of
uint8 x int8 products in 16 bits (VPMADDUBSW), which saturates with full-range weights: the
same file then computes something else than on a VNNI, ARM or exact-integer device (measured
on an AVX2-only EPYC: logits off by up to 7.6, validation min-metric off by up to 14 points).
With 7-bit weights no pair sum can saturate, so the file computes the same everywhere (up to
a rounding step of the output).
"""
import contextlib
import logging
import os
import tempfile

import numpy as np
import onnx
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                      quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

from public.core.atomic import replacing


class CalibrationSegments(CalibrationDataReader):
    """The calibration segments (N, C, L) as onnxruntime reads them: batches of 32."""

    def __init__(self, input_name, x, batch_size=32):
        x = np.asarray(x, dtype=np.float32)[..., None]
        self._batches = iter([{input_name: x[i:i + batch_size]}
                              for i in range(0, len(x), batch_size)])

    def get_next(self):
        return next(self._batches, None)


def compact_names(model):
    """Rename internal tensors to short ids and drop node names and value_info: QDQ graphs
    carry ~100 Q/DQ nodes whose long generated names would otherwise be most of the file."""
    graph = model.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    names = {}

    def short(name):
        if not name or name in keep:
            return name
        return names.setdefault(name, f"t{len(names)}")
    for tensor in graph.initializer:
        tensor.name = short(tensor.name)
    for node in graph.node:
        node.name = ''
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    del graph.value_info[:]
    del model.metadata_props[:]
    return model


@contextlib.contextmanager
def quiet_root_logger():
    """onnxruntime.quantization's root-logger warnings silenced while it runs."""
    # onnxruntime.quantization logs a root-logger WARNING per BatchNorm weight ("Axis 1 is
    # out-of-range ... rank 1": per-channel does not apply to 1-D tensors, which it then
    # quantizes per tensor, as intended). Hundreds of lines per run would bury the log.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_int8(float_path, int8_path, calibration_x, reduce_range=False):
    """Write the INT8 model of float_path to int8_path; return its size in bytes.
    reduce_range: 7-bit weights (see the module docstring)."""
    input_name = onnx.load(float_path, load_external_data=False).graph.input[0].name
    with tempfile.TemporaryDirectory() as tmp, quiet_root_logger():
        prepared, written = os.path.join(tmp, 'prepared.onnx'), os.path.join(tmp, 'int8.onnx')
        quant_pre_process(float_path, prepared, skip_symbolic_shape=True)
        quantize_static(prepared, written, CalibrationSegments(input_name, calibration_x),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        reduce_range=bool(reduce_range))
        return write_int8_model(onnx.load(written), int8_path)


def write_int8_model(model, path):
    """Write an INT8 ModelProto (modified: names compacted) to path, checked, whole or not
    at all; its size in bytes."""
    model = compact_names(model)
    onnx.checker.check_model(model)
    with replacing(path, name_full_disk=False) as tmp:
        onnx.save(model, tmp)
    return os.path.getsize(path)

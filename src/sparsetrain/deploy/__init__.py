"""Shipping a trained sparse model: a compact safetensors file, fast sparse inference, ONNX.

- :func:`export_sparse` writes a model's weights with each sparse weight compact (values and
  indices, or blocks), its construction recipe and a checksum (:mod:`.format`);
- :func:`load_sparse` reads it back as a module for inference, on the CSR kernels or dense;
- :func:`read_sparse` gives the file's content (tensors, recipe, info) without a module;
- :func:`export_onnx` writes a model as ONNX (dense layers with zeros) and :func:`check_onnx`
  runs the file in onnxruntime against the model (:mod:`.onnx_export`).
"""

from .export import export_sparse
from .format import FORMAT_VERSION, SparseFileError, SparseModel, SparseWeight
from .load import load_sparse, read_sparse
from .onnx_export import OnnxDependencyError, OnnxExportError, check_onnx, export_onnx

__all__ = ["FORMAT_VERSION", "OnnxDependencyError", "OnnxExportError", "SparseFileError",
           "SparseModel", "SparseWeight", "check_onnx", "export_onnx", "export_sparse",
           "load_sparse", "read_sparse"]

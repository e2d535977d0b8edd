"""ONNX and TensorRT export (issue E)."""

"""Adapters to the deploy runtimes: export to ONNX and TensorRT, ONNX Runtime sessions, OpenVINO
models for the CPU, detection agreement between a model and its reference, and latency timed
fairly."""

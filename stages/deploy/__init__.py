"""Adapters to the deploy runtimes: export to ONNX and TensorRT, ONNX Runtime sessions, detection
agreement between a model and its reference, and latency timed fairly."""

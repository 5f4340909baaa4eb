"""The onnx technique: export (`export`), ONNX Runtime sessions and quantization (`backend`), the sweep
technique itself (`technique`)."""

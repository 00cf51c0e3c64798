"""headrace edge profile: ONNX Runtime backends, torch-free."""

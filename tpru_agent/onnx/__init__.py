"""ONNX export (``tpru export --format onnx``) and the manifest the onnx engine reads; importing this imports no torch."""

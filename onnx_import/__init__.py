"""The ONNX front end: an exported model lowered onto the engine's ops (docs/onnx.md)."""

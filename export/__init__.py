"""AdaptBIR export side: torch model definitions, checkpoint loading, ONNX/TensorRT export."""

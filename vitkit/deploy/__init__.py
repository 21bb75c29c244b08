"""Deployment: export to ONNX and torch.export, ONNX Runtime over image folders, the original's result files, prediction."""

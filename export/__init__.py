"""`python -m export`: a diffusers Stable Diffusion pipeline into the Triton model repository
(ONNX files, TensorRT engines, the model config Triton loads)."""

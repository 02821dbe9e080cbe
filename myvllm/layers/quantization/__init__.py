"""Quantized weight formats: how a checkpoint's quantization_config is read (config.py) and how
a quantized linear layer holds, loads and multiplies its weights (fp8.py)."""

"""Pixel quantization (DQ, docs/method.md §4): GradCAM++ patch dropping, the uint8 patch store
and MAE reconstruction."""

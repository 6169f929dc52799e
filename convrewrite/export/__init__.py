"""What ``apply`` writes: readable PyTorch source, safetensors weights, the JSON report."""

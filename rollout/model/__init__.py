"""The decoder and what it reads and writes: weights (loader), RoPE, attention, the K/V tensors."""

"""ipu_norm: batch-independent normalization for convolutional networks.

GroupNorm / LayerNorm with Proxy Norm, NF-ResNets / NFNets with Scaled Weight Standardization and
Adaptive Gradient Clipping, and BatchNorm baselines; trained on Graphcore IPUs through PopTorch or on
CPU/GPU with plain PyTorch from the same models and configs.
"""

__version__ = "0.1.0"

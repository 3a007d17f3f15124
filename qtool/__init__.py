"""qtool: offline quantization toolchain for large language models.

Imports nothing heavy: `qtool --help` must not import torch.
"""

__version__ = "0.1.0"

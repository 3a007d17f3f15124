"""qtool's optional CUDA kernels (built lazily on first use; see `kernels_cuda.ops`)."""

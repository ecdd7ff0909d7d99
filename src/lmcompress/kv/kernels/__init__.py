"""Triton kernels for packed KV storage (CUDA only): quantize-and-pack, and split-sequence decode attention that
reads packed 2/4/8-bit keys and values directly. Importing this package does not import Triton; see
:mod:`.dispatch` for when the kernels are used."""

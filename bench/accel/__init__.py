"""Real PyTorch speedups for the UNet: precision casts, torch.compile, torchao and PT2E integer kernels.

Each helper takes the FP32 UNet (a private copy) and returns a module with the UNet's call signature
`(x, t, context)`, so the pipeline, the VAE and the text encoder are untouched.
"""

"""Structured compression of the UNet: channel/head/FFN pruning, BK-SDM block removal, separable convs.

Each function takes a UNet and returns a smaller one with a new architecture (so real kernels get faster);
`stable_diffusion.unet_arch` saves and loads such UNets.
"""

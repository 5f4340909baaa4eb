"""Modifiers: sweep axes shared by every technique (compile, sample steps, recovery...), one module each.

The runner applies them after the technique's `apply`, in registry order; see `base.Modifier`.
"""

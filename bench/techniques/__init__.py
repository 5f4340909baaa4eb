"""Compression techniques, one module each: a `Technique` subclass registered with `@TECHNIQUES.register`.

`bench.registry.TECHNIQUES` imports every module here on first use, so a new technique needs no edit
elsewhere: its declared axes become CLI flags, its columns results.csv columns, README rows and plot labels.
"""

"""The bottom layer of the bundle's scripts: small shared helpers that import nothing from above."""

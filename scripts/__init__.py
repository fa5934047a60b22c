"""Custom components of the brain_t1w_motion_classification bundle.

Configs reference them as ``scripts.<module>.<Name>``; MONAI Label requires the package to be
called ``scripts``.
"""

"""Inference task of the MONAI Label app for the brain_t1w_motion_classification bundle."""

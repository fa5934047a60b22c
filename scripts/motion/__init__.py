"""Synthetic motion: transforms that corrupt motion-free T1w images with simulated patient motion."""

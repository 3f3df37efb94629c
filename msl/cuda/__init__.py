"""MSL on an NVIDIA GPU: compiler.py (MSL -> PTX, no CUDA toolkit needed) and launch.py (runs the PTX through the
CUDA driver on torch's stream; needs torch with CUDA)."""

"""The MSL toolchain: runs Metal Shading Language kernels off the Mac (README.md in this folder).

msl.frontend: preprocessing and the pre-pass both targets share; msl.cpu: the Metal-on-CPU emulator (compiler,
runtime, ctypes API, the emulated package build's launcher); msl.cuda: the same MSL compiled to PTX for an NVIDIA
GPU, and its launcher.
"""

// Stand-in: the emulator's shim (metal_stdlib.h) provides this header's contents.

{
  description = "Flake for the metal-flash-sdpa kernels";

  inputs = {
    # Pinned to the kernels release whose loader the package targets (kernels 0.19.1): its kernel-builder reads
    # build.toml edition 6 and compiles Metal with -std=metal4.0 (Metal 4.0, macOS 26 on Apple silicon). There is no
    # flake.lock yet: Nix is not available where this package is developed, so the first `nix run .#build-and-copy`
    # on a Mac writes it (commit it then; `nix flake lock` does the same without building).
    kernel-builder.url = "github:huggingface/kernels/v0.19.1";
  };

  outputs =
    {
      self,
      kernel-builder,
    }:
    kernel-builder.lib.genKernelFlakeOutputs {
      inherit self;
      path = ./.;
    };
}

// Test-only instantiation of the tensor-op forward kernel (flash_sdpa/attention_tensor_ops.h), until the package builds
// and routes it: tests/test_tensor_ops_attention.py runs it on the emulator with the varlen planner's launch plans.
// Kernel names: flash_attn_varlen_tops_<float32|float16|bfloat16>_d<head dim>.
#include "attention_tensor_ops.h"

#define FLASH_SDPA_STR_(x) #x
#define FLASH_SDPA_STR(x) FLASH_SDPA_STR_(x)

#define FLASH_SDPA_INSTANTIATE_TOPS(T, TNAME, D)                                           \
  template [[host_name(FLASH_SDPA_STR(flash_attn_varlen_tops_##TNAME##_d##D))]] [[kernel]] \
  decltype(flash_attn_varlen_tops<T, D>) flash_attn_varlen_tops<T, D>;

// Every type at head dims 32 to 128 (multiples of 32: the varlen list's); 256 in half / bfloat only (float's Q tile
// alone would be 32 KB: flash_sdpa::tops_supports).
#define FLASH_SDPA_TOPS_HEAD_DIMS(Y, a, b) Y(a, b, 32) Y(a, b, 64) Y(a, b, 96) Y(a, b, 128)
#define FLASH_SDPA_INSTANTIATE_TOPS_DTYPE(T, TNAME) FLASH_SDPA_TOPS_HEAD_DIMS(FLASH_SDPA_INSTANTIATE_TOPS, T, TNAME)

FLASH_SDPA_VARLEN_DTYPES(FLASH_SDPA_INSTANTIATE_TOPS_DTYPE)
FLASH_SDPA_INSTANTIATE_TOPS(half, float16, 256)
FLASH_SDPA_INSTANTIATE_TOPS(bfloat, bfloat16, 256)

// The tensor-ops library: the kernels of attention_tensor_ops.h, compiled apart from the metallib. kernel-builder
// compiles only .metal files, so this header is not built with the package: the Mac glue compiles it at run time from
// the source it embeds (metal_launch.mm, kTensorOpsSources: this file and the headers it includes, in include order),
// only on GPUs of Apple family 10, and a compiler or driver that rejects it costs the tensor-ops path, never the
// package. The emulated build compiles it as a kernel library of its own (scripts/build_emulated.py), the proxy as the
// target attention_tensor_ops. Kernel names: flash_attn_varlen_tops_<float32|float16|bfloat16>_d<head dim> (64-row
// query tiles: the one the planner routes to, varlen_planner.cpp) and flash_attn_varlen_tops32_... (32-row tiles on
// the simdgroup forward's plan, kept to compare); the backward's dK/dV and dQ passes,
// flash_attn_bwd_<dkdv|dq>_tops_<dtype>_d<head dim> (attention_backward_tensor_ops.h, backward_planner.cpp).
#include "attention_backward_tensor_ops.h"
#include "attention_tensor_ops.h"

#define FLASH_SDPA_STR_(x) #x
#define FLASH_SDPA_STR(x) FLASH_SDPA_STR_(x)

#define FLASH_SDPA_INSTANTIATE_TOPS(T, TNAME, D)                                             \
  template [[host_name(FLASH_SDPA_STR(flash_attn_varlen_tops_##TNAME##_d##D))]] [[kernel]]   \
  decltype(flash_attn_varlen_tops<T, D>) flash_attn_varlen_tops<T, D>;                       \
  template [[host_name(FLASH_SDPA_STR(flash_attn_varlen_tops32_##TNAME##_d##D))]] [[kernel]] \
  decltype(flash_attn_varlen_tops32<T, D>) flash_attn_varlen_tops32<T, D>;

// Every type at head dims 32 to 128 (multiples of 32: the varlen list's); 256 in half / bfloat only (float's Q tile
// alone would be 32 KB: flash_sdpa::tops_supports). varlen_planner.cpp's tensor_ops_supports names the same set.
#define FLASH_SDPA_TOPS_HEAD_DIMS(Y, a, b) Y(a, b, 32) Y(a, b, 64) Y(a, b, 96) Y(a, b, 128)
#define FLASH_SDPA_INSTANTIATE_TOPS_DTYPE(T, TNAME) FLASH_SDPA_TOPS_HEAD_DIMS(FLASH_SDPA_INSTANTIATE_TOPS, T, TNAME)

// D = 256 (half / bfloat): the 64-row tile on the D-split kernel (8 simdgroups, varlen_params.h tops_split_d).
#define FLASH_SDPA_INSTANTIATE_TOPS_SPLIT(T, TNAME, D)                                       \
  template [[host_name(FLASH_SDPA_STR(flash_attn_varlen_tops_##TNAME##_d##D))]] [[kernel]]   \
  decltype(flash_attn_varlen_tops_dsplit<T, D>) flash_attn_varlen_tops_dsplit<T, D>;         \
  template [[host_name(FLASH_SDPA_STR(flash_attn_varlen_tops32_##TNAME##_d##D))]] [[kernel]] \
  decltype(flash_attn_varlen_tops32<T, D>) flash_attn_varlen_tops32<T, D>;

FLASH_SDPA_VARLEN_DTYPES(FLASH_SDPA_INSTANTIATE_TOPS_DTYPE)
FLASH_SDPA_INSTANTIATE_TOPS_SPLIT(half, float16, 256)
FLASH_SDPA_INSTANTIATE_TOPS_SPLIT(bfloat, bfloat16, 256)

// The backward's dK/dV and dQ passes: every type at FLASH_SDPA_BWD_TOPS_HEAD_DIMS, 256 in half / bfloat only (float's
// K and V tiles alone would be 32 KB: bwd_tops_supports). backward_planner.cpp's backward_tops_serves reads the lists.
#define FLASH_SDPA_INSTANTIATE_BWD_TOPS(T, TNAME, D)                                         \
  template [[host_name(FLASH_SDPA_STR(flash_attn_bwd_dkdv_tops_##TNAME##_d##D))]] [[kernel]] \
  decltype(flash_attn_bwd_dkdv_tops<T, D>) flash_attn_bwd_dkdv_tops<T, D>;                   \
  template [[host_name(FLASH_SDPA_STR(flash_attn_bwd_dq_tops_##TNAME##_d##D))]] [[kernel]]   \
  decltype(flash_attn_bwd_dq_tops<T, D>) flash_attn_bwd_dq_tops<T, D>;
#define FLASH_SDPA_INSTANTIATE_BWD_TOPS_DTYPE(T, TNAME) \
  FLASH_SDPA_BWD_TOPS_HEAD_DIMS(FLASH_SDPA_INSTANTIATE_BWD_TOPS, T, TNAME)

FLASH_SDPA_VARLEN_DTYPES(FLASH_SDPA_INSTANTIATE_BWD_TOPS_DTYPE)
FLASH_SDPA_BWD_TOPS_WIDE_HEAD_DIMS(FLASH_SDPA_INSTANTIATE_BWD_TOPS, half, float16)
FLASH_SDPA_BWD_TOPS_WIDE_HEAD_DIMS(FLASH_SDPA_INSTANTIATE_BWD_TOPS, bfloat, bfloat16)

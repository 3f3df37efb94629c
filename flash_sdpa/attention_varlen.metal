// Instantiates the varlen / dense flash-attention kernel (attention_varlen.h) for every supported dtype and head
// dim of varlen_params.h (flash_attn_varlen_wide for the wide head dims). Kernel names:
// flash_attn_varlen_<float32|float16|bfloat16>_d<head dim>, the same names flash_sdpa::varlen_kernel_name() builds on
// the host.
#include "attention_varlen.h"

#define FLASH_SDPA_STR_(x) #x
#define FLASH_SDPA_STR(x) FLASH_SDPA_STR_(x)

#define FLASH_SDPA_INSTANTIATE_VARLEN(T, TNAME, D)                                    \
  template [[host_name(FLASH_SDPA_STR(flash_attn_varlen_##TNAME##_d##D))]] [[kernel]] \
  decltype(flash_attn_varlen<T, D>) flash_attn_varlen<T, D>;

#define FLASH_SDPA_INSTANTIATE_VARLEN_WIDE(T, TNAME, D)                               \
  template [[host_name(FLASH_SDPA_STR(flash_attn_varlen_##TNAME##_d##D))]] [[kernel]] \
  decltype(flash_attn_varlen_wide<T, D>) flash_attn_varlen_wide<T, D>;

#define FLASH_SDPA_INSTANTIATE_VARLEN_DTYPE(T, TNAME)                  \
  FLASH_SDPA_VARLEN_HEAD_DIMS(FLASH_SDPA_INSTANTIATE_VARLEN, T, TNAME) \
  FLASH_SDPA_VARLEN_WIDE_HEAD_DIMS(FLASH_SDPA_INSTANTIATE_VARLEN_WIDE, T, TNAME)

FLASH_SDPA_VARLEN_DTYPES(FLASH_SDPA_INSTANTIATE_VARLEN_DTYPE)

// Instantiates the FlashAttention-2 backward kernels (attention_backward.h) for every dtype and every head dim of
// the forward (FLASH_SDPA_BWD_HEAD_DIMS, backward_params.h). Kernel names, built alike by
// flash_sdpa::backward_kernel_name() on the host:
//   flash_attn_bwd_delta_<float32|float16|bfloat16>, flash_attn_bwd_dkdv_sum_<dtype>
//   flash_attn_bwd_dkdv_<dtype>_d<head dim>, flash_attn_bwd_dq_<dtype>_d<head dim>
#include "attention_backward.h"

#define FLASH_SDPA_BWD_STR_(x) #x
#define FLASH_SDPA_BWD_STR(x) FLASH_SDPA_BWD_STR_(x)

#define FLASH_SDPA_INSTANTIATE_BWD(T, TNAME, D)                                             \
  template [[host_name(FLASH_SDPA_BWD_STR(flash_attn_bwd_dkdv_##TNAME##_d##D))]] [[kernel]] \
  decltype(flash_attn_bwd_dkdv<T, D>) flash_attn_bwd_dkdv<T, D>;                            \
  template [[host_name(FLASH_SDPA_BWD_STR(flash_attn_bwd_dq_##TNAME##_d##D))]] [[kernel]]   \
  decltype(flash_attn_bwd_dq<T, D>) flash_attn_bwd_dq<T, D>;

#define FLASH_SDPA_INSTANTIATE_BWD_DTYPE(T, TNAME)                                       \
  template [[host_name(FLASH_SDPA_BWD_STR(flash_attn_bwd_delta_##TNAME))]] [[kernel]]    \
  decltype(flash_attn_bwd_delta<T>) flash_attn_bwd_delta<T>;                             \
  template [[host_name(FLASH_SDPA_BWD_STR(flash_attn_bwd_dkdv_sum_##TNAME))]] [[kernel]] \
  decltype(flash_attn_bwd_dkdv_sum<T>) flash_attn_bwd_dkdv_sum<T>;                       \
  FLASH_SDPA_BWD_HEAD_DIMS(FLASH_SDPA_INSTANTIATE_BWD, T, TNAME)

FLASH_SDPA_VARLEN_DTYPES(FLASH_SDPA_INSTANTIATE_BWD_DTYPE)

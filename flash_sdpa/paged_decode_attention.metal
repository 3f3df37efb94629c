// Instantiates paged_decode_attention (dtype x head dim x row tile; the matrix path's own instances), the wide path's
// paged_decode_wide and paged_decode_combine (dtype) from the supported-configuration lists in paged_params.h. Bodies:
// paged_decode_attention.h, paged_decode_wide.h.
#include "paged_decode_attention.h"
#include "paged_decode_wide.h"

// clang-format off
#define FLASH_SDPA_INSTANTIATE_DECODE_R(R, D, T, TN)                                     \
  template [[host_name(FLASH_SDPA_PAGED_DECODE_NAME(TN, D, R))]] [[kernel]]             \
  decltype(paged_decode_attention<T, D, R, false>) paged_decode_attention<T, D, R, false>;

#define FLASH_SDPA_INSTANTIATE_DECODE_MATRIX(R, D, T, TN)                                \
  template [[host_name(FLASH_SDPA_PAGED_DECODE_MATRIX_NAME(TN, D, R))]] [[kernel]]      \
  decltype(paged_decode_attention<T, D, R, true>) paged_decode_attention<T, D, R, true>;

#define FLASH_SDPA_INSTANTIATE_DECODE_WIDE(R, D, T, TN)                                  \
  template [[host_name(FLASH_SDPA_PAGED_DECODE_WIDE_NAME(TN, D, R))]] [[kernel]]        \
  decltype(paged_decode_wide<T, D, R>) paged_decode_wide<T, D, R>;

#define FLASH_SDPA_INSTANTIATE_DECODE(D, MAXR, T, TN) \
  FLASH_SDPA_PAGED_ROWS_UPTO_##MAXR(FLASH_SDPA_INSTANTIATE_DECODE_R, D, T, TN)

#define FLASH_SDPA_INSTANTIATE_COMBINE(T, TN)                                            \
  template [[host_name(FLASH_SDPA_PAGED_COMBINE_NAME(TN))]] [[kernel]]                  \
  decltype(paged_decode_combine<T>) paged_decode_combine<T>;
// clang-format on

#define FLASH_SDPA_INSTANTIATE_DTYPE(T, TN) \
  FLASH_SDPA_INSTANTIATE_COMBINE(T, TN)     \
  FLASH_SDPA_PAGED_HEAD_DIMS(FLASH_SDPA_INSTANTIATE_DECODE, T, TN)

FLASH_SDPA_PAGED_DTYPES(FLASH_SDPA_INSTANTIATE_DTYPE)
FLASH_SDPA_PAGED_MATRIX_INSTANCES(FLASH_SDPA_INSTANTIATE_DECODE_MATRIX)
FLASH_SDPA_PAGED_WIDE_INSTANCES(FLASH_SDPA_INSTANTIATE_DECODE_WIDE)

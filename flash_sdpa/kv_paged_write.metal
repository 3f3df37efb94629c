// kv_paged_write: appends the new tokens' K/V to a paged cache in place, all requests in one dispatch.
//
// Grid (ceil(Hkv * D / kWriteThreads), sk_new, B); a thread copies one (h, d) element of token i of request b.
// The slot is t = cache_seqlens[b] + i: block block_table[b, t / block_size], row t % block_size.
// Whatever block_table / cache_seqlens hold, nothing outside the bound buffers is touched: padding rows
// (cache_seqlens < 0), slots past the table (t >= max_blocks_per_seq * block_size) and block ids outside
// [0, num_blocks) are skipped.
#include <metal_stdlib>

#include "paged_params.h"

using namespace metal;
using namespace flash_sdpa::paged;

template <typename T>
[[max_total_threads_per_threadgroup(FLASH_SDPA_PAGED_WRITE_THREADS)]] kernel void kv_paged_write(
    device const T* k_new [[buffer(FLASH_SDPA_WRITE_BUF_K_NEW)]],
    device const T* v_new [[buffer(FLASH_SDPA_WRITE_BUF_V_NEW)]],
    device T* k_cache [[buffer(FLASH_SDPA_WRITE_BUF_K_CACHE)]],
    device T* v_cache [[buffer(FLASH_SDPA_WRITE_BUF_V_CACHE)]],
    device const int* block_table [[buffer(FLASH_SDPA_WRITE_BUF_BLOCK_TABLE)]],
    device const int* cache_seqlens [[buffer(FLASH_SDPA_WRITE_BUF_CACHE_SEQLENS)]],
    constant KVPagedWriteParams& p [[buffer(FLASH_SDPA_WRITE_BUF_PARAMS)]], uint3 tgid [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]]) {
  const int b = int(tgid.z);
  const int i = int(tgid.y);
  const int e = int(tgid.x) * kWriteThreads + int(tid);  // (h, d) flattened
  if (b >= p.batch || i >= p.seqlen_new || e >= p.num_kv_heads * p.head_dim) {
    return;
  }
  const int seqlen = cache_seqlens[b];
  const int capacity = p.max_blocks_per_seq * p.block_size;  // host checks it fits in int32
  if (seqlen < 0 || seqlen >= capacity - i) {
    return;  // padding row, or slot beyond the block table
  }
  const int t = seqlen + i;
  const int block = block_table[long(b) * p.block_table_stride_b + t / p.block_size];
  if (block < 0 || block >= p.num_blocks) {
    return;
  }
  const int h = e / p.head_dim;
  const int d = e - h * p.head_dim;
  // cache (num_blocks, block_size, Hkv, D = 1); new (B, sk_new, Hkv, D = 1)
  const long slot = long(t % p.block_size);
  k_cache[long(block) * p.k_cache_stride_block + slot * p.k_cache_stride_slot + long(h) * p.k_cache_stride_h + d] =
      k_new[long(b) * p.k_new_stride_b + long(i) * p.k_new_stride_s + long(h) * p.k_new_stride_h + d];
  v_cache[long(block) * p.v_cache_stride_block + slot * p.v_cache_stride_slot + long(h) * p.v_cache_stride_h + d] =
      v_new[long(b) * p.v_new_stride_b + long(i) * p.v_new_stride_s + long(h) * p.v_new_stride_h + d];
}

#define FLASH_SDPA_INSTANTIATE_WRITE(T, TN) \
  template [[host_name(FLASH_SDPA_PAGED_WRITE_NAME(TN))]] [[kernel]] decltype(kv_paged_write<T>) kv_paged_write<T>;

FLASH_SDPA_PAGED_DTYPES(FLASH_SDPA_INSTANTIATE_WRITE)

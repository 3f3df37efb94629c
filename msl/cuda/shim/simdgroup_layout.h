// Lane layouts of an 8x8 simdgroup_matrix and of the mma.sync fragments it is lowered to, as constexpr functions of
// the lane: shared by the NVPTX shim (metal_stdlib.h) and its host test (tests/metal_cuda/test_mma_layout.py), which
// checks them against a model of mma.sync's documented semantics. Plain C++17: no CUDA, no MSL.
#pragma once

#include <stdint.h>

namespace mcu_sgm {

// ---- Apple's layout (public through MLX's BaseMMAFrag::get_coord, which MLX's and llama.cpp's kernels rely on) ----
// Lane l holds row row(l), columns col(l) and col(l) + 1: thread_elements()[0] and [1].
constexpr uint32_t row(uint32_t l) { return ((l >> 2) & 4u) + ((l >> 1) & 3u); }
constexpr uint32_t col(uint32_t l) { return ((l >> 2) & 2u) * 2u + (l & 1u) * 2u; }
// The inverse: the lane holding row r, columns 2p and 2p + 1 (bit 0 of l = p & 1, bits 1-2 = r & 3, bit 3 = p >> 1,
// bit 4 = r >> 2).
constexpr uint32_t lane(uint32_t r, uint32_t p) {
  return (p & 1u) | ((r & 3u) << 1) | ((p >> 1) << 3) | ((r >> 2) << 4);
}

// ---- mma.sync.m16n8k8 / m16n8k16, .f16 / .bf16 inputs, .f32 accumulators (PTX ISA, "Matrix Fragments for
// mma.m16n8k8" and "mma.m16n8k16"): groupID g = m >> 2, threadID_in_group t = m % 4 for lane m.
//   A (16 x K, row): register j of k8 holds A[g + 8j][2t], A[g + 8j][2t + 1]; k16 adds A[..][2t + 8], [2t + 9].
//   B (K x 8, col): register 0 holds B[2t][g], B[2t + 1][g]; k16's register 1 holds rows 2t + 8, 2t + 9.
//   C, D (16 x 8): c0, c1 = C[g][2t], C[g][2t + 1]; c2, c3 = C[g + 8][2t], C[g + 8][2t + 1].
// The lower-indexed element of a register pair sits in its low 16 bits. Our 8x8 product uses rows 0-7 of A, C and D.

// A and C into mma lane m: A[g][2t..2t+1] and C[g][2t..2t+1] are a whole Apple pair, held by this lane.
constexpr uint32_t ac_source(uint32_t m) { return lane(m >> 2, m & 3u); }
// B into mma lane m: B[2t + i][g] (i = 0, 1) is element b_element(m) of the pair that this lane holds (Apple keeps
// pairs along a row, mma along a column: a transpose, one shuffle per row).
constexpr uint32_t b_source(uint32_t m, uint32_t i) { return lane(2u * (m & 3u) + i, (m >> 2) >> 1); }
constexpr uint32_t b_element(uint32_t m) { return (m >> 2) & 1u; }
// mma lane m's B register from the two pairs it received (rows 2t and 2t + 1): element b_element(m) of each, row 2t
// in the low half. On the GPU one prmt (0x5410: both low halves; 0x7632: both high halves).
inline __attribute__((always_inline)) uint32_t b_join(uint32_t row0_pair, uint32_t row1_pair, uint32_t m) {
#ifdef __CUDA_ARCH__
  return __nvvm_prmt(row0_pair, row1_pair, b_element(m) ? 0x7632u : 0x5410u);
#else
  return b_element(m) ? (row0_pair >> 16) | (row1_pair & 0xffff0000u) : (row0_pair & 0xffffu) | (row1_pair << 16);
#endif
}
// D back into Apple lane l: its pair D[row(l)][col(l)..] is mma lane 4 row(l) + col(l) / 2's d0, d1.
constexpr uint32_t d_source(uint32_t l) { return 4u * row(l) + col(l) / 2u; }

// ---- float fragments: x = hi + mid + lo in bfloat, exact for normal x (8 + 8 + 8 significand bits) ----------------
// x * y = hi*hi + hi*mid + mid*hi + hi*lo + lo*hi + mid*mid + (terms below 2^-26 |x y|), every product exact in the
// tensor core's fp32: ~fp32 accuracy, unlike tf32 (11 bits) or a single bfloat.
// Round to nearest even to bfloat, the bits in the low half (finite x; NaN keeps a quiet NaN).
constexpr uint32_t bf16_bits(float x) {
  const uint32_t b = __builtin_bit_cast(uint32_t, x);
  if ((b & 0x7fffffffu) > 0x7f800000u) return (b >> 16) | 0x40u;
  return (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
}
constexpr float bf16_value(uint32_t bits) { return __builtin_bit_cast(float, bits << 16); }
// The three bfloat parts of each of a pair (x0, x1), packed as mma operands: x0 in the low half. On the GPU the
// rounding is cvt.rn.bf16x2 and the residuals add.rn (an intrinsic: fast math must not reassociate them away); the
// host test runs the integer rounding above, the same round-to-nearest-even.
struct split3 {
  uint32_t hi, mid, lo;
};
#ifdef __CUDA_ARCH__
inline __attribute__((always_inline)) uint32_t bf16x2_bits(float x0, float x1) {
  return __builtin_bit_cast(uint32_t, __nvvm_ff2bf16x2_rn(x1, x0));
}
inline __attribute__((always_inline)) float exact_sub(float a, float b) { return __nvvm_add_rn_f(a, -b); }
#else
inline uint32_t bf16x2_bits(float x0, float x1) { return bf16_bits(x0) | (bf16_bits(x1) << 16); }
inline float exact_sub(float a, float b) { return a - b; }
#endif
inline __attribute__((always_inline)) split3 split_pair(float x0, float x1) {
  const uint32_t h = bf16x2_bits(x0, x1);
  const float r0 = exact_sub(x0, bf16_value(h & 0xffffu)), r1 = exact_sub(x1, bf16_value(h >> 16));
  const uint32_t m = bf16x2_bits(r0, r1);
  const uint32_t l = bf16x2_bits(exact_sub(r0, bf16_value(m & 0xffffu)), exact_sub(r1, bf16_value(m >> 16)));
  return {h, m, l};
}

// The operands of the two m16n8k16 (bf16, fp32 accumulators) that sum the six partial products of a split A pair sa
// and B pair sb (K = 16: two 8-wide halves; rows 8-15 of A are a second row block):
//   1: rows 0-7 = [hi | hi] x [B hi ; B mid],  rows 8-15 = [mid | mid] x [B hi ; B mid]
//   2: rows 0-7 = [lo | hi] x [B hi ; B lo],   rows 8-15 = 0
// so rows 0-7 + rows 8-15 of D (the same lane's d0 + d2, d1 + d3) = hh + hm + mh + mm + lh + hl, from C.
// A registers in PTX order (rows g / g + 8 of k 0-7, then of k 8-15), B registers (k 0-7, k 8-15).
struct k16_operands {
  uint32_t a[4], b[2];
};
constexpr k16_operands split_step(int step, split3 sa, split3 sb) {
  if (step == 0) return {{sa.hi, sa.mid, sa.hi, sa.mid}, {sb.hi, sb.mid}};
  return {{sa.lo, 0u, sa.hi, 0u}, {sb.hi, sb.lo}};
}

}  // namespace mcu_sgm

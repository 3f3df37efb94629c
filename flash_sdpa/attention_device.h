// Device helpers every attention kernel shares (varlen, paged decode, backward), so that the options' function
// constants, the score transform, the masking value, the LSE store and the prefill grid order cannot drift apart
// between kernels. MSL only.
//
// Metal compiles with fast math: inf/NaN arithmetic is undefined, so masked scores use a finite large negative,
// empty rows are recognised explicitly, and checks on values are integer bit tests.
#pragma once

#include <metal_stdlib>

#include "attention_options.h"

// The options' function constants (attention_options.h), the same in every kernel.
constant bool fc_varlen [[function_constant(FLASH_SDPA_FC_VARLEN)]];
constant bool fc_softcap [[function_constant(FLASH_SDPA_FC_SOFTCAP)]];
constant bool fc_alibi [[function_constant(FLASH_SDPA_FC_ALIBI)]];
constant bool fc_sinks [[function_constant(FLASH_SDPA_FC_SINKS)]];

namespace flash_sdpa {

// The score of a key a row does not see, a sentinel no finite score reaches (every kernel): visible scores are
// clamped to [-kScoreLimit, kScoreLimit] (natural log, after softcap and ALiBi), so in the log2 domain too they lie
// within +-1.45e38, above kNoScore = -3e38, and the difference of two of them never overflows float; a running max
// above kNoScore has seen a visible key. No real score comes near 1e38; FlashAttention-2 overflows there.
constant constexpr float kScoreLimit = 1.0e38f;
constant constexpr float kNoScore = -3.0e38f;
inline float clamp_score(float s) { return metal::clamp(s, -kScoreLimit, kScoreLimit); }

// LSE buffers are bound as uint: -inf and NaN are stored as bit patterns, so no inf value exists in a kernel.
constant constexpr uint kNegInfBits = 0xff800000u;
constant constexpr uint kNanBits = 0x7fc00000u;

// softcap * tanh(s / softcap). Apple's fast tanh goes through exp and returns NaN once e^2x overflows (|x| > ~44);
// tanh(15) is 1 in fp32, so clamping the argument changes no result and keeps fast math finite.
inline float apply_softcap(float s, float softcap) {
  return softcap * metal::tanh(metal::clamp(s / softcap, -15.0f, 15.0f));
}

// True when x is NaN or +-inf: its exponent bits are all ones. Fast math may fold isnan/isinf to false, and LLVM
// rewrites the masked compare (bits & 0x7f800000) == 0x7f800000 into the same class test (folded to false under
// fast math by clang 19, as the emulator shows); the shifted compare below is left as integer arithmetic.
inline bool is_nonfinite(float x) { return (metal::as_type<uint>(x) << 1) >= 0xff000000u; }

// Four consecutive elements of a row at src (4-element aligned: the planners' aligned_rows bits), or zeros where
// !valid: a staging loop that moves 4 elements per load.
template <typename T>
inline metal::vec<T, 4> load_row4(const device T* src, bool valid) {
  return valid ? *reinterpret_cast<const device metal::vec<T, 4>*>(src) : metal::vec<T, 4>(T(0));
}

// Selects x's non-finite elements to 0 (a staged operand summed over rows by a product must not carry them to rows
// that do not see them); returns whether there was one.
template <typename T>
inline bool drop_nonfinite4(thread metal::vec<T, 4>& x) {
  bool dropped = false;
  for (int e = 0; e < 4; ++e) {
    const bool bad = is_nonfinite(float(x[e]));
    dropped = dropped || bad;
    x[e] = bad ? T(0) : x[e];
  }
  return dropped;
}

// Sequence b's rows in a packed tensor of `rows` rows, from the prefix sums `cu`: (first row, row count), clamped to
// [0, rows] whatever cu holds (negative, decreasing or past the tensor).
inline int2 packed_rows(const device int* cu, int b, int rows) {
  const int first = metal::clamp(cu[b], 0, rows);
  return int2(first, metal::clamp(cu[b + 1], first, rows) - first);
}

// Keys [lo, hi] that a query at key position `pos` sees, for a window (left, right) (-1 = unbounded) over sk keys,
// clamped to [0, sk - 1] (hi < lo: none). 64-bit intermediates: no int32 overflow whatever the window holds.
inline int2 visible_keys(int pos, int window_left, int window_right, int sk) {
  const long lo = window_left < 0 ? 0 : metal::max(long(pos) - long(window_left), 0l);
  const long hi = window_right < 0 ? long(sk) - 1 : metal::min(long(pos) + long(window_right), long(sk) - 1);
  return int2(int(lo), int(metal::max(hi, -1l)));
}

// visible_keys through the call's window.
inline int2 visible_keys(int pos, constant OptionParams& opt, int sk) {
  return visible_keys(pos, opt.window_left, opt.window_right, sk);
}

// A threadgroup's place in a grid (heads, B, row tiles) (the varlen forward, the backward's dK/dV and dQ): head x,
// sequence y, and the row tiles first_tile, first_tile + step, ... GPUs, Apple's too, start threadgroups roughly in
// grid order, x fastest, z slowest: with the tile axis slowest and `reversed` (causal query tiles, whose work grows
// with their index) taking z from the end, the batch's heaviest tiles (every head of every sequence) start first and
// the light ones fill the end of the dispatch (longest processing time first). With the tiles on x, a varlen batch's
// last sequence started its heaviest tiles after all the other sequences' work, and their long tail left cores idle
// at the end of the dispatch (the proxy's forward: 0.85x MLX's per-sequence launches on a 4-sequence batch at
// D = 128). A long call split into dispatches (planner_common.h: interleaved_dispatches) gives dispatch tile_offset of
// tile_stride the tiles tile_offset, tile_offset + tile_stride, ...; unsplit: 0 of 1. Slots past a sequence's rows
// exit at once.
struct RowTileSlot {
  int head, b, first_tile, step;
};

inline RowTileSlot row_tile_slot(uint3 tg_pos, uint3 tg_count, bool reversed, int tile_offset, int tile_stride) {
  const int z = reversed ? int(tg_count.z) - 1 - int(tg_pos.z) : int(tg_pos.z);
  return {int(tg_pos.x), int(tg_pos.y), tile_offset + z * tile_stride, int(tg_count.z) * tile_stride};
}

// The ALiBi slope of (sequence b, head h): slopes [H] or [B, H] (opt.alibi_batch_stride).
inline float alibi_slope(const device float* slopes, constant OptionParams& opt, int b, int h) {
  return slopes[long(b) * opt.alibi_batch_stride + h];
}

}  // namespace flash_sdpa

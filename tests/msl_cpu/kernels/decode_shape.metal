// A decode-shaped attention kernel for the emulator's own speed test: one simdgroup per (batch, head), each lane
// owns D/32 dimensions, online softmax over the keys. Contiguous K/V [B, S, H, D], float32.
#include <metal_stdlib>
using namespace metal;

struct DecodeShapeParams {
  uint seq_len;
  uint num_heads;
  float scale;
};

template <int D>
[[kernel]] void decode_shape(device const float* q [[buffer(0)]], device const float* k [[buffer(1)]],
                             device const float* v [[buffer(2)]], device float* out [[buffer(3)]],
                             constant DecodeShapeParams& p [[buffer(4)]], uint2 tg [[threadgroup_position_in_grid]],
                             uint lane [[thread_index_in_simdgroup]]) {
  constexpr int per_lane = D / 32;
  const uint h = tg.x, b = tg.y;
  float qv[per_lane], acc[per_lane];
  for (int i = 0; i < per_lane; ++i) {
    qv[i] = q[(b * p.num_heads + h) * D + lane * per_lane + i] * p.scale;
    acc[i] = 0.0f;
  }
  float m = -1e30f, l = 0.0f;
  for (uint t = 0; t < p.seq_len; ++t) {
    const uint base = ((b * p.seq_len + t) * p.num_heads + h) * D + lane * per_lane;
    float s = 0.0f;
    for (int i = 0; i < per_lane; ++i) s += qv[i] * k[base + i];
    s = simd_sum(s);
    const float m_new = max(m, s);
    const float alpha = exp(m - m_new), w = exp(s - m_new);
    l = l * alpha + w;
    for (int i = 0; i < per_lane; ++i) acc[i] = acc[i] * alpha + w * v[base + i];
    m = m_new;
  }
  for (int i = 0; i < per_lane; ++i) out[(b * p.num_heads + h) * D + lane * per_lane + i] = acc[i] / l;
}
template [[host_name("decode_shape_d128")]] [[kernel]] decltype(decode_shape<128>) decode_shape<128>;

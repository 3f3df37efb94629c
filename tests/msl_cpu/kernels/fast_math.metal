// Apple's fast math as the emulator models it (tests/msl_cpu/test_fast_math.py): each math function in its plain,
// fast:: and precise:: spelling, division and plain arithmetic, on inputs read from a buffer (no constant folding).
#include <metal_stdlib>
using namespace metal;

constant constexpr uint kColumns = 32;

kernel void math_variants(device const float* xs [[buffer(0)]], device const float* ys [[buffer(1)]],
                          device float* out [[buffer(2)]], uint i [[thread_position_in_grid]]) {
  const float x = xs[i], y = ys[i];
  device float* o = out + kColumns * i;
  o[0] = tanh(x);
  o[1] = fast::tanh(x);
  o[2] = precise::tanh(x);
  o[3] = exp(x);
  o[4] = fast::exp(x);
  o[5] = precise::exp(x);
  o[6] = exp2(x);
  o[7] = fast::exp2(x);
  o[8] = precise::exp2(x);
  o[9] = log(x);
  o[10] = fast::log(x);
  o[11] = precise::log(x);
  o[12] = log2(x);
  o[13] = fast::log2(x);
  o[14] = precise::log2(x);
  o[15] = rsqrt(x);
  o[16] = fast::rsqrt(x);
  o[17] = precise::rsqrt(x);
  o[18] = sqrt(x);
  o[19] = fast::sqrt(x);
  o[20] = precise::sqrt(x);
  o[21] = pow(x, y);
  o[22] = fast::pow(x, y);
  o[23] = precise::pow(x, y);
  o[24] = x / y;
  o[25] = fast::divide(x, y);
  o[26] = precise::divide(x, y);
  o[27] = x * y;
  o[28] = x + y;
  o[29] = float(tanh(half(clamp(x, -60000.0f, 60000.0f))));  // half has one variant
  o[30] = exp10(x);
  o[31] = log10(x);
}

// Gemma-style logit softcapping, written the obvious way and the way the package's kernels write it.
kernel void softcap(device const float* s [[buffer(0)]], constant float& cap [[buffer(1)]],
                    device float* out [[buffer(2)]], uint i [[thread_position_in_grid]]) {
  out[2 * i] = cap * tanh(s[i] / cap);
  out[2 * i + 1] = cap * tanh(clamp(s[i] / cap, -15.0f, 15.0f));  // tanh(15) is 1 in fp32: no result changes
}

// The same operations on float4 vectors: the fast model applies elementwise.
kernel void math_variants4(device const float4* xs [[buffer(0)]], device float4* out [[buffer(1)]],
                           uint i [[thread_position_in_grid]]) {
  const float4 x = xs[i];
  out[4 * i + 0] = tanh(x);
  out[4 * i + 1] = precise::tanh(x);
  out[4 * i + 2] = exp(x);
  out[4 * i + 3] = float4(1.0f) / x;
}

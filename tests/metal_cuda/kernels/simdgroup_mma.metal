// The proxy's simdgroup_matrix lowering on the GPU (test_gpu.py::test_simdgroup_matrix_lowering), built for each
// lowering (targets --mma N). CUDA target only: it reads thread_elements(), which the emulator rejects and the
// project's kernels never use.
#include <metal_stdlib>
using namespace metal;

// D = A x B + C on one simdgroup: A row-major, B stored transposed (b[n * 8 + k] = B[k][n]), C and D row-major.
template <typename TA, typename TB, typename TC, typename TD>
kernel void sgm_mac(device const TA* a [[buffer(0)]], device const TB* b [[buffer(1)]],
                    device const TC* c [[buffer(2)]], device TD* d [[buffer(3)]]) {
  simdgroup_matrix<TA, 8, 8> ma;
  simdgroup_matrix<TB, 8, 8> mb;
  simdgroup_matrix<TC, 8, 8> mc;
  simdgroup_matrix<TD, 8, 8> md;
  simdgroup_load(ma, a);
  simdgroup_load(mb, b, 8, ulong2(0, 0), true);
  simdgroup_load(mc, c);
  simdgroup_multiply_accumulate(md, ma, mb, mc);
  simdgroup_store(md, d);
}

// D = A x B over K = 32 in four accumulating steps: A [8 x 32], B [32 x 8], both row-major, D float.
template <typename T>
kernel void sgm_chain(device const T* a [[buffer(0)]], device const T* b [[buffer(1)]], device float* d [[buffer(2)]]) {
  simdgroup_matrix<float, 8, 8> acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  for (uint k = 0; k < 4; ++k) {
    simdgroup_matrix<T, 8, 8> ma, mb;
    simdgroup_load(ma, a, 32, ulong2(8 * k, 0));
    simdgroup_load(mb, b + 64 * k, 8);
    simdgroup_multiply_accumulate(acc, ma, mb, acc);
  }
  simdgroup_store(acc, d);
}

// Each lane's thread_elements() of m (m[r * 8 + c] = r * 8 + c): the lane layout, out[2 lane + i].
kernel void sgm_layout(device const float* m [[buffer(0)]], device float* out [[buffer(1)]],
                       uint lane [[thread_index_in_simdgroup]]) {
  simdgroup_matrix<float, 8, 8> x;
  simdgroup_load(x, m);
  out[2 * lane] = x.thread_elements()[0];
  out[2 * lane + 1] = x.thread_elements()[1];
}

template [[host_name("sgm_mac_half_half_float")]] [[kernel]] decltype(sgm_mac<half, half, float, float>)
    sgm_mac<half, half, float, float>;
template [[host_name("sgm_mac_bfloat_bfloat_float")]] [[kernel]] decltype(sgm_mac<bfloat, bfloat, float, float>)
    sgm_mac<bfloat, bfloat, float, float>;
template [[host_name("sgm_mac_float_float_float")]] [[kernel]] decltype(sgm_mac<float, float, float, float>)
    sgm_mac<float, float, float, float>;
template [[host_name("sgm_mac_float_half_float")]] [[kernel]] decltype(sgm_mac<float, half, float, float>)
    sgm_mac<float, half, float, float>;
template [[host_name(
    "sgm_mac_half_half_half")]] [[kernel]] decltype(sgm_mac<half, half, half, half>) sgm_mac<half, half, half, half>;
template [[host_name("sgm_mac_bfloat_bfloat_bfloat")]] [[kernel]] decltype(sgm_mac<bfloat, bfloat, bfloat, bfloat>)
    sgm_mac<bfloat, bfloat, bfloat, bfloat>;
template [[host_name("sgm_chain_half")]] [[kernel]] decltype(sgm_chain<half>) sgm_chain<half>;
template [[host_name("sgm_chain_bfloat")]] [[kernel]] decltype(sgm_chain<bfloat>) sgm_chain<bfloat>;
template [[host_name("sgm_chain_float")]] [[kernel]] decltype(sgm_chain<float>) sgm_chain<float>;

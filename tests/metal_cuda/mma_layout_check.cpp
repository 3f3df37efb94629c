// Host check of the proxy's simdgroup_matrix -> mma.sync lowering (msl/cuda/shim/simdgroup_layout.h), no GPU:
// the lane maps, the B join and the float split run here against a model of mma.sync written from the PTX ISA's
// fragment tables, and every 8x8 product is compared with a plain matmul. Built and run by test_mma_layout.py.
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "simdgroup_layout.h"

using namespace mcu_sgm;

static int failures = 0;
#define CHECK(cond, ...)            \
  do {                              \
    if (!(cond)) {                  \
      if (failures++ < 20) {        \
        printf("FAIL %s: ", #cond); \
        printf(__VA_ARGS__);        \
        printf("\n");               \
      }                             \
    }                               \
  } while (0)

// ---- the model: mma.sync.aligned.m16n8k{8,16}.row.col.f32.{f16,bf16}.{f16,bf16}.f32 --------------------------------
// PTX ISA, "Matrix Fragments for mma.m16n8k8" / "mma.m16n8k16" (floating point types), groupID = lane >> 2,
// threadID_in_group = lane % 4; element i of a register list (two 16-bit elements per register, element 2j in the
// low half of register j):
//   k8  A: a_i, i < 4: row = groupID (i < 2) or groupID + 8, col = 2 threadID_in_group + (i & 1)
//   k16 A: a_i, i < 8: row = groupID (i in {0, 1, 4, 5}) or groupID + 8, col = 2 tig + (i & 1) (+ 8 for i >= 4)
//   k8  B: b_i, i < 2: row = 2 tig + i, col = groupID;  k16 B: b_i, i < 4: row = 2 tig + (i & 1) (+ 8 for i >= 2)
//   C, D: c_i, i < 4: row = groupID (i < 2) or groupID + 8, col = 2 tig + (i & 1)
typedef float (*decode16)(uint32_t bits);

static float bf16_decode(uint32_t bits) { return bf16_value(bits & 0xffffu); }
static float f16_decode(uint32_t bits) {
  _Float16 h;
  const uint16_t b = (uint16_t)bits;
  memcpy(&h, &b, 2);
  return (float)h;
}
static uint32_t f16_bits(float x) {
  const _Float16 h = (_Float16)x;
  uint16_t b;
  memcpy(&b, &h, 2);
  return b;
}

// d[lane][4] = A x B + c, K = 8 or 16, products exact, summed in fp32 in k order (the hardware's order is its own).
static void model_mma(int K, decode16 dec, const uint32_t a[32][4], const uint32_t b[32][2], const float c[32][4],
                      float d[32][4]) {
  float A[16][16] = {}, B[16][8] = {}, C[16][8] = {};
  for (int m = 0; m < 32; ++m) {
    const int g = m >> 2, t = m & 3;
    for (int i = 0; i < 2 * (K / 4); ++i) {  // k8: 4 A elements, k16: 8
      const int row = g + ((i >> 1) & 1) * 8, col = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
      A[row][col] = dec(a[m][i >> 1] >> (16 * (i & 1)));
    }
    for (int i = 0; i < K / 4; ++i) {  // k8: 2 B elements, k16: 4
      const int row = 2 * t + (i & 1) + (i >= 2 ? 8 : 0);
      B[row][g] = dec(b[m][i >> 1] >> (16 * (i & 1)));
    }
    for (int i = 0; i < 4; ++i) C[g + (i >> 1) * 8][2 * t + (i & 1)] = c[m][i];
  }
  for (int m = 0; m < 32; ++m) {
    const int g = m >> 2, t = m & 3;
    for (int i = 0; i < 4; ++i) {
      const int row = g + (i >> 1) * 8, col = 2 * t + (i & 1);
      float s = C[row][col];
      for (int k = 0; k < K; ++k) s += A[row][k] * B[k][col];
      d[m][i] = s;
    }
  }
}

// ---- random numbers ---------------------------------------------------------------------------------------------
static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint32_t next_u32() {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return (uint32_t)(rng >> 11);
}
static float small_value() { return (float)((int)(next_u32() % 33) - 16) / 8.0f; }  // exact in half and bfloat
static float wide_value() {  // any float of magnitude 2^-20 .. 2^20, full 24-bit significand
  const float m = 1.0f + (float)(next_u32() & 0x7fffff) / 8388608.0f;
  return ldexpf(next_u32() & 1 ? -m : m, (int)(next_u32() % 41) - 20);
}

// ---- the checks ---------------------------------------------------------------------------------------------------
static void check_layout() {
  int seen[8][4] = {};
  for (uint32_t l = 0; l < 32; ++l) {
    // MLX's BaseMMAFrag::get_coord, restated: qid = l / 4, fm = (qid & 4) + (l / 2) % 4, fn = (qid & 2) * 2 + (l % 2) *
    // 2
    const uint32_t qid = l / 4, fm = (qid & 4) + (l / 2) % 4, fn = (qid & 2) * 2 + (l % 2) * 2;
    CHECK(row(l) == fm && col(l) == fn, "lane %u: (%u, %u) != MLX (%u, %u)", l, row(l), col(l), fm, fn);
    CHECK(lane(row(l), col(l) / 2) == l, "lane(row, pair) of lane %u", l);
    seen[row(l)][col(l) / 2]++;
    CHECK(d_source(l) < 32 && ac_source(d_source(l)) == l, "d_source inverts ac_source at lane %u", l);
  }
  for (int r = 0; r < 8; ++r)
    for (int p = 0; p < 4; ++p) CHECK(seen[r][p] == 1, "pair (%d, %d) held %d times", r, p, seen[r][p]);
}

// The Apple-layout pair of lane l of an 8x8 matrix M, packed (element 0 low) or as floats.
static uint32_t pack_pair(const float M[8][8], uint32_t l, uint32_t (*bits)(float)) {
  return bits(M[row(l)][col(l)]) | (bits(M[row(l)][col(l) + 1]) << 16);
}

static uint32_t bf16_bits_fn(float x) { return bf16_bits(x); }

// half x half or bfloat x bfloat: one m16n8k8 on the permuted fragments, D permuted back.
static void check_mma16(bool bf16, int trials) {
  decode16 dec = bf16 ? bf16_decode : f16_decode;
  uint32_t (*bits)(float) = bf16 ? bf16_bits_fn : f16_bits;
  for (int trial = 0; trial < trials; ++trial) {
    float A[8][8], B[8][8], C[8][8];
    for (int i = 0; i < 8; ++i)
      for (int j = 0; j < 8; ++j) A[i][j] = small_value(), B[i][j] = small_value(), C[i][j] = small_value();
    uint32_t a[32][4] = {}, b[32][2] = {};
    float c[32][4] = {}, d[32][4];
    for (uint32_t m = 0; m < 32; ++m) {  // what lane m receives by shuffles from the Apple layout
      a[m][0] = pack_pair(A, ac_source(m), bits);
      b[m][0] = b_join(pack_pair(B, b_source(m, 0), bits), pack_pair(B, b_source(m, 1), bits), m);
      const uint32_t cs = ac_source(m);
      c[m][0] = C[row(cs)][col(cs)];
      c[m][1] = C[row(cs)][col(cs) + 1];
    }
    model_mma(8, dec, a, b, c, d);
    for (uint32_t l = 0; l < 32; ++l)
      for (int k = 0; k < 2; ++k) {
        const uint32_t r = row(l), cc = col(l) + k;
        float want = C[r][cc];
        for (int i = 0; i < 8; ++i) want += A[r][i] * B[i][cc];  // small values: every sum exact
        CHECK(d[d_source(l)][k] == want, "%s lane %u elem %d: %g != %g", bf16 ? "bf16" : "f16", l, k, d[d_source(l)][k],
              want);
      }
  }
}

// float (or mixed) fragments: three-bfloat split, two m16n8k16, D rows 0-7 + 8-15, permuted back.
static void check_split(int trials) {
  for (int i = 0; i < 10000; ++i) {
    const float x0 = wide_value(), x1 = wide_value();
    const split3 s = split_pair(x0, x1);
    const double y0 = (double)bf16_value(s.hi & 0xffffu) + bf16_value(s.mid & 0xffffu) + bf16_value(s.lo & 0xffffu);
    const double y1 = (double)bf16_value(s.hi >> 16) + bf16_value(s.mid >> 16) + bf16_value(s.lo >> 16);
    CHECK(y0 == (double)x0 && y1 == (double)x1, "split of (%a, %a) not exact", x0, x1);
  }
  double worst = 0.0;
  for (int trial = 0; trial < trials; ++trial) {
    float A[8][8], B[8][8], C[8][8];
    for (int i = 0; i < 8; ++i)
      for (int j = 0; j < 8; ++j) A[i][j] = wide_value(), B[i][j] = wide_value(), C[i][j] = wide_value();
    float d[32][4], c[32][4] = {};
    split3 sa[32], sb[32];
    for (uint32_t m = 0; m < 32; ++m) {
      const uint32_t as = ac_source(m), b0 = b_source(m, 0), b1 = b_source(m, 1), e = b_element(m);
      sa[m] = split_pair(A[row(as)][col(as)], A[row(as)][col(as) + 1]);
      sb[m] = split_pair(B[row(b0)][col(b0) + e], B[row(b1)][col(b1) + e]);
      c[m][0] = C[row(as)][col(as)];
      c[m][1] = C[row(as)][col(as) + 1];
    }
    for (int step = 0; step < 2; ++step) {
      uint32_t a[32][4], b[32][2];
      for (int m = 0; m < 32; ++m) {
        const k16_operands o = split_step(step, sa[m], sb[m]);
        memcpy(a[m], o.a, sizeof o.a);
        memcpy(b[m], o.b, sizeof o.b);
      }
      model_mma(16, bf16_decode, a, b, c, d);
      memcpy(c, d, sizeof d);
    }
    for (uint32_t l = 0; l < 32; ++l)
      for (int k = 0; k < 2; ++k) {
        const uint32_t r = row(l), cc = col(l) + k, m = d_source(l);
        double want = C[r][cc], mag = fabs((double)C[r][cc]);
        for (int i = 0; i < 8; ++i) {
          want += (double)A[r][i] * B[i][cc];
          mag += fabs((double)A[r][i] * B[i][cc]);
        }
        const double got = (double)(d[m][0 + k] + d[m][2 + k]);
        const double err = fabs(got - want) / mag;
        if (err > worst) worst = err;
        // fp32 summation of 8 products and C: a few 2^-24 of the magnitude; plain tf32 would be ~2^-11.
        CHECK(err <= 16 * 5.96e-8, "split lane %u elem %d: %.9g vs %.9g (relative %.3g)", l, k, got, want, err);
      }
  }
  printf("split: worst error %.3g of sum |a b| + |c| (2^-24 = 5.96e-8)\n", worst);
}

int main() {
  check_layout();
  check_mma16(false, 200);
  check_mma16(true, 200);
  check_split(200);
  printf("%s (%d failures)\n", failures ? "FAILED" : "ok", failures);
  return failures ? 1 : 0;
}

// Vector math and checks shared by limner's C++ CPU kernels (AVX-512); kernels/_cpp.py puts this text
// in front of each kernel's source before compiling it.
#include <ATen/native/CPUBlas.h>
#include <immintrin.h>
#include <algorithm>
#include <exception>
#include <vector>

// Whether torch's cpublas runs a bf16 batch-reduce GEMM (oneDNN's) on this CPU: tried once, on one
// 1 x 16 x 2 product, since could_pack(kBFloat16) answers for AMX alone while the GEMM also runs on
// avx512_bf16 (AMD's Zen 4), and where it runs nowhere it throws. The answer is kept: the attention
// dispatcher asks at every call.
static inline bool bf16_brgemm_tried() {
  try {
    std::vector<at::BFloat16> a(2, at::BFloat16(1.f)), b(32, at::BFloat16(1.5f));
    std::vector<float> c(16, 0.f);
    at::native::cpublas::brgemm(1, 16, 2, 2, 16, 16, false, a.data(), b.data(), c.data());
    at::native::cpublas::brgemm_release();
    return std::all_of(c.begin(), c.end(), [](float v) { return v == 3.f; });
  } catch (const std::exception&) {
    return false;
  }
}
static inline bool bf16_brgemm_runs() {
  static const bool runs = bf16_brgemm_tried();
  return runs;
}

// 2^x as 2^round(x) * (degree-7 Taylor polynomial of e^(f ln 2)), f in [-1/2, 1/2]; 0 below -126.
static inline __m512 exp2_ps(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.f), _CMP_GE_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-126.f)), _mm512_set1_ps(128.f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.5252733804059840e-5f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381608e-4f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

static inline __m512 sigmoid_ps(__m512 u) {  // 1 / (1 + e^-u)
  const __m512 e = exp2_ps(_mm512_mul_ps(u, _mm512_set1_ps(-1.4426950408889634f)));
  return _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_add_ps(_mm512_set1_ps(1.f), e));
}

// limner's GEGLU for the CPU (AVX-512, float32), forward and backward, built at first use by
// kernels/geglu.py (torch.utils.cpp_extension).
//
// x [rows, 2F] contiguous = [a, b] along the last dimension; out = a * gelu(b) with the exact
// (erf) GELU, gelu(b) = b * Phi(b). The backward reads x and dout once and writes dx once:
// dx = [dout * gelu(b), dout * a * gelu'(b)], gelu'(b) = Phi(b) + b * phi(b). Eager PyTorch runs
// GELU, the product, GELU's backward, two products and the concatenation of the two halves'
// gradients, each a pass of its own.
//
// Phi(b) = 1 - Phi(-b) for b >= 0, and Phi(-|b|) = erfc(|b| / sqrt 2) / 2 with erfc(z) ~
// t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) e^{-z^2}, t = 1 / (1 + p z): Abramowitz & Stegun 7.1.26,
// absolute error <= 1.5e-7 (the formula torch's own vectorised erf uses). e^{-z^2} = e^{-b^2 / 2}
// is phi(b) * sqrt(2 pi): one exponential serves both.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

static inline void gelu_parts(__m512 b, __m512& cdf, __m512& pdf) {
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 z = _mm512_mul_ps(_mm512_abs_ps(b), _mm512_set1_ps(0.70710678118654752f));
  const __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(z, _mm512_set1_ps(0.3275911f), one));
  __m512 poly = _mm512_set1_ps(1.061405429f);
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-1.453152027f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(1.421413741f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-0.284496736f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.254829592f));
  poly = _mm512_mul_ps(poly, t);
  const __m512 e = exp2_ps(_mm512_mul_ps(_mm512_mul_ps(z, z), _mm512_set1_ps(-1.4426950408889634f)));
  const __m512 tail = _mm512_mul_ps(_mm512_mul_ps(poly, e), _mm512_set1_ps(0.5f));  // Phi(-|b|)
  const __mmask16 positive = _mm512_cmp_ps_mask(b, _mm512_setzero_ps(), _CMP_GE_OQ);
  cdf = _mm512_mask_blend_ps(positive, tail, _mm512_sub_ps(one, tail));
  pdf = _mm512_mul_ps(e, _mm512_set1_ps(0.3989422804014327f));  // 1 / sqrt(2 pi)
}

static inline __mmask16 lanes(int64_t left) { return left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1); }

// x [rows, 2F] float32 contiguous; returns out [rows, F].
at::Tensor forward(at::Tensor x) {
  const int64_t F = x.size(-1) / 2, rows = x.numel() / (2 * F);
  auto sizes = x.sizes().vec();
  sizes.back() = F;
  auto out = at::empty(sizes, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / F), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float *a = xp + r * 2 * F, *bp = a + F;
      float* o = op + r * F;
      for (int64_t j = 0; j < F; j += 16) {
        const __mmask16 m = lanes(F - j);
        const __m512 b = _mm512_maskz_loadu_ps(m, bp + j);
        __m512 cdf, pdf;
        gelu_parts(b, cdf, pdf);
        _mm512_mask_storeu_ps(o + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, a + j), _mm512_mul_ps(b, cdf)));
      }
    }
  });
  return out;
}

// x [rows, 2F], dout [rows, F], both float32 contiguous; returns dx [rows, 2F].
at::Tensor backward(at::Tensor x, at::Tensor dout) {
  const int64_t F = x.size(-1) / 2, rows = x.numel() / (2 * F);
  auto dx = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *gp = dout.data_ptr<float>();
  float* dp = dx.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / F), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float *a = xp + r * 2 * F, *bp = a + F, *g = gp + r * F;
      float* d = dp + r * 2 * F;
      for (int64_t j = 0; j < F; j += 16) {
        const __mmask16 m = lanes(F - j);
        const __m512 b = _mm512_maskz_loadu_ps(m, bp + j), go = _mm512_maskz_loadu_ps(m, g + j);
        __m512 cdf, pdf;
        gelu_parts(b, cdf, pdf);
        _mm512_mask_storeu_ps(d + j, m, _mm512_mul_ps(go, _mm512_mul_ps(b, cdf)));
        const __m512 slope = _mm512_fmadd_ps(b, pdf, cdf);  // gelu'(b)
        _mm512_mask_storeu_ps(d + F + j, m, _mm512_mul_ps(_mm512_mul_ps(go, _mm512_maskz_loadu_ps(m, a + j)), slope));
      }
    }
  });
  return dx;
}

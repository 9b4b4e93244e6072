// limner's fused GroupNorm + FiLM + SiLU for the CPU on channels-last float32 activations (AVX-512),
// forward and backward, built at first use by kernels/group_norm_silu.py (torch.utils.cpp_extension).
//
// y = silu(u), u = ((x - mean_g) * rstd_g * w + b) * (1 + scale) + shift = x * a + e per (sample,
// channel), the semantics of group_norm_silu_reference. Memory is [N, HW, C]: a sample's pixels
// stream with its C channels as 16-wide vectors, so per-channel sums over the pixels are vector adds
// and a group is a slice of each vector. One thread owns one sample. Forward: one pass for the
// per-channel sums (shifted by each group's first value, against cancellation), then
// y = silu(x * a + e). Backward (formulas as in the Triton kernel, group_norm_silu.py): one pass for
// the per-channel sums of du and du * x, du = dy * silu'(u) with u recomputed, then
// dx = du * a + x * k1 + k0 with per-group k1, k0. Per-sample sums of the weight, bias, scale and
// shift gradients go out as [N, C]; the caller sums over samples.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <vector>

struct Coefs {  // per-channel a, e of u = x * a + e for one sample, and the pieces the backward needs
  std::vector<float> a, e, m, w, b;
  explicit Coefs(int64_t C) : a(C), e(C), m(C), w(C), b(C) {}
  void make(int64_t C, int64_t G, const float* mean, const float* rstd, const float* wp, const float* bp,
            const float* sc, const float* sh) {
    const int64_t Cg = C / G;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t g = c / Cg;
      w[c] = wp ? wp[c] : 1.f; b[c] = bp ? bp[c] : 0.f; m[c] = sc ? 1.f + sc[c] : 1.f;
      a[c] = rstd[g] * w[c] * m[c];
      e[c] = (b[c] - mean[g] * rstd[g] * w[c]) * m[c] + (sh ? sh[c] : 0.f);
    }
  }
};

// x [N, C, H, W] channels-last; weight, bias [C] or empty; scale, shift [N, C] or empty.
// Returns y (channels-last) and mean, rstd [N, G].
std::vector<at::Tensor> forward(at::Tensor x, int64_t G, at::Tensor weight, at::Tensor bias, double eps,
                                at::Tensor scale, at::Tensor shift) {
  const int64_t N = x.size(0), C = x.size(1), S = x.size(2) * x.size(3), Cg = C / G;
  auto y = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  auto mean = at::empty({N, G}, x.options()), rstd = at::empty({N, G}, x.options());
  const float* xp = x.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *mp = mean.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  const float* wp = weight.numel() ? weight.data_ptr<float>() : nullptr;
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  const float* scp = scale.numel() ? scale.data_ptr<float>() : nullptr;
  const float* shp = shift.numel() ? shift.data_ptr<float>() : nullptr;
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> pivot(C), sum(C), sq(C);
    Coefs k(C);
    for (int64_t n = begin; n < end; ++n) {
      const float* xn = xp + n * S * C;
      for (int64_t c = 0; c < C; ++c) pivot[c] = xn[(c / Cg) * Cg];  // the group's first value
      for (int64_t c = 0; c < C; c += 16) {
        const __m512 pv = _mm512_loadu_ps(pivot.data() + c);
        __m512 s0 = _mm512_setzero_ps(), q0 = _mm512_setzero_ps();
        for (int64_t i = 0; i < S; ++i) {
          const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(xn + i * C + c), pv);
          s0 = _mm512_add_ps(s0, d);
          q0 = _mm512_fmadd_ps(d, d, q0);
        }
        _mm512_storeu_ps(sum.data() + c, s0);
        _mm512_storeu_ps(sq.data() + c, q0);
      }
      for (int64_t g = 0; g < G; ++g) {
        double s1 = 0, s2 = 0;
        for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) { s1 += sum[c]; s2 += sq[c]; }
        const double cnt = (double)Cg * S, ms = s1 / cnt, var = std::max(s2 / cnt - ms * ms, 0.0);
        mp[n * G + g] = (float)(ms + pivot[g * Cg]);
        rp[n * G + g] = (float)(1.0 / std::sqrt(var + eps));
      }
      k.make(C, G, mp + n * G, rp + n * G, wp, bp, scp ? scp + n * C : nullptr, shp ? shp + n * C : nullptr);
      float* yn = yp + n * S * C;
      for (int64_t i = 0; i < S; ++i)
        for (int64_t c = 0; c < C; c += 16) {
          const __m512 u = _mm512_fmadd_ps(_mm512_loadu_ps(xn + i * C + c), _mm512_loadu_ps(k.a.data() + c),
                                           _mm512_loadu_ps(k.e.data() + c));
          _mm512_storeu_ps(yn + i * C + c, _mm512_mul_ps(u, sigmoid_ps(u)));
        }
    }
  });
  return {y, mean, rstd};
}

// dx (channels-last) and per-sample [N, C] sums: dweight, dbias, dscale, dshift.
std::vector<at::Tensor> backward(at::Tensor dy, at::Tensor x, int64_t G, at::Tensor weight, at::Tensor bias,
                                 at::Tensor scale, at::Tensor shift, at::Tensor mean, at::Tensor rstd) {
  const int64_t N = x.size(0), C = x.size(1), S = x.size(2) * x.size(3), Cg = C / G;
  auto dx = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  auto sums = at::empty({4, N, C}, x.options());
  const float *xp = x.data_ptr<float>(), *gp = dy.data_ptr<float>();
  const float *mp = mean.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  float *dxp = dx.data_ptr<float>(), *sp = sums.data_ptr<float>();
  const float* wp = weight.numel() ? weight.data_ptr<float>() : nullptr;
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  const float* scp = scale.numel() ? scale.data_ptr<float>() : nullptr;
  const float* shp = shift.numel() ? shift.data_ptr<float>() : nullptr;
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sdu(C), sdux(C), k1(C), k0(C);
    Coefs k(C);
    for (int64_t n = begin; n < end; ++n) {
      const float *xn = xp + n * S * C, *gn = gp + n * S * C, *mn = mp + n * G, *rn = rp + n * G;
      k.make(C, G, mn, rn, wp, bp, scp ? scp + n * C : nullptr, shp ? shp + n * C : nullptr);
      for (int64_t c = 0; c < C; c += 16) {
        const __m512 a = _mm512_loadu_ps(k.a.data() + c), e = _mm512_loadu_ps(k.e.data() + c);
        __m512 s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps();
        for (int64_t i = 0; i < S; ++i) {
          const __m512 xv = _mm512_loadu_ps(xn + i * C + c);
          const __m512 u = _mm512_fmadd_ps(xv, a, e), sg = sigmoid_ps(u);
          // du = dy * s * (1 + u * (1 - s))
          const __m512 du = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(gn + i * C + c), sg),
                                          _mm512_fmadd_ps(u, _mm512_sub_ps(_mm512_set1_ps(1.f), sg), _mm512_set1_ps(1.f)));
          s1 = _mm512_add_ps(s1, du);
          s2 = _mm512_fmadd_ps(du, xv, s2);
        }
        _mm512_storeu_ps(sdu.data() + c, s1);
        _mm512_storeu_ps(sdux.data() + c, s2);
      }
      float *dw = sp + n * C, *db = sp + (N + n) * C, *dsc = sp + (2 * N + n) * C, *dsh = sp + (3 * N + n) * C;
      const double cnt = (double)Cg * S;
      for (int64_t g = 0; g < G; ++g) {
        const double mu = mn[g], rs = rn[g];
        double p1 = 0, p2 = 0;
        for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
          const double t = rs * ((double)sdux[c] - mu * sdu[c]);  // sum du * xhat
          const double wm = (double)k.w[c] * k.m[c];
          p1 += wm * sdu[c]; p2 += wm * t;
          dw[c] = (float)(k.m[c] * t); db[c] = k.m[c] * sdu[c];
          dsc[c] = (float)(k.w[c] * t + k.b[c] * sdu[c]); dsh[c] = sdu[c];
        }
        const double c1 = -rs * rs * p2 / cnt, c0 = rs * (mu * rs * p2 - p1) / cnt;
        for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) { k1[c] = (float)c1; k0[c] = (float)c0; }
      }
      float* dxn = dxp + n * S * C;
      for (int64_t i = 0; i < S; ++i)
        for (int64_t c = 0; c < C; c += 16) {
          const __m512 xv = _mm512_loadu_ps(xn + i * C + c), a = _mm512_loadu_ps(k.a.data() + c);
          const __m512 u = _mm512_fmadd_ps(xv, a, _mm512_loadu_ps(k.e.data() + c)), sg = sigmoid_ps(u);
          const __m512 du = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(gn + i * C + c), sg),
                                          _mm512_fmadd_ps(u, _mm512_sub_ps(_mm512_set1_ps(1.f), sg), _mm512_set1_ps(1.f)));
          const __m512 lin = _mm512_fmadd_ps(xv, _mm512_loadu_ps(k1.data() + c), _mm512_loadu_ps(k0.data() + c));
          _mm512_storeu_ps(dxn + i * C + c, _mm512_fmadd_ps(du, a, lin));
        }
    }
  });
  return {dx, sums};
}

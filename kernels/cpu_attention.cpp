// limner's fused attention for the CPU at head dim 16 (AVX-512): softmax(q k^T / 4) v, forward and
// backward, built at first use by kernels/cpu_attention.py (torch.utils.cpp_extension).
//
// One thread owns one (batch, head) (at::parallel_for over B*H). Its keys and values are copied
// once into an L1-sized workspace, both transposed ([16, Lp], for the rows of scores) and as rows
// ([Lp, 16], for the weighted sums), Lp = Lk rounded up to 16 with masked-out padding. Queries go
// four at a time: each 16-key slice of k^T is loaded once for four rows of logits; the softmax is
// taken in base 2 (logits pre-scaled by log2 e) with exp2 as 2^round(x) * a degree-7 polynomial
// (vscalefps); a row's weighted sum of values is one vector FMA per key. The forward keeps each
// row's log-sum-exp; the backward recomputes the probabilities from it (as FlashAttention does,
// Dao et al. 2022), forms dS = P * (dP - rowsum(dO * O)) and accumulates dQ per row and dK, dV per
// key in the thread's workspace, so no thread writes where another does: deterministic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <vector>

struct Head {  // one (batch, head): keys and values transposed and as rows, the key bias; padded to Lp keys
  int64_t Lk, Lp;
  std::vector<float> kt, vt, k, v, bias;
  Head(int64_t lk) : Lk(lk), Lp((lk + 15) / 16 * 16), kt(16 * Lp), vt(16 * Lp), k(Lp * 16), v(Lp * 16), bias(Lp) {}
  void load(const float* kb, int64_t ksl, const float* vb, int64_t vsl, const float* mb, float c) {
    for (int64_t j = 0; j < Lp; ++j) {
      const bool real = j < Lk;
      bias[j] = !real ? -INFINITY : (mb ? mb[j] : 0.f);
      for (int d = 0; d < 16; ++d) {
        const float kv = real ? kb[j * ksl + d] : 0.f, vv = real ? vb[j * vsl + d] : 0.f;
        kt[d * Lp + j] = kv * c; vt[d * Lp + j] = vv; k[j * 16 + d] = kv; v[j * 16 + d] = vv;
      }
    }
  }
};

// For QB rows x_r (16 floats each): s[r][j] = x_r . t[:, j] (+ bias_j), t [16, Lp] transposed; row maxima in mx.
template <int QB>
static inline void row_dots(const float* const* x, const float* t, const float* bias, int64_t Lp, float* s, float* mx) {
  __m512 m[QB];
  for (int r = 0; r < QB; ++r) m[r] = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < Lp; j += 16) {
    __m512 a[QB], b[QB];
    const __m512 b0 = bias ? _mm512_loadu_ps(bias + j) : _mm512_setzero_ps();
    for (int r = 0; r < QB; ++r) { a[r] = b0; b[r] = _mm512_setzero_ps(); }
    for (int d = 0; d < 16; d += 2) {
      const __m512 t0 = _mm512_loadu_ps(t + d * Lp + j), t1 = _mm512_loadu_ps(t + (d + 1) * Lp + j);
      for (int r = 0; r < QB; ++r) {
        a[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r][d]), t0, a[r]);
        b[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r][d + 1]), t1, b[r]);
      }
    }
    for (int r = 0; r < QB; ++r) {
      const __m512 v = _mm512_add_ps(a[r], b[r]);
      _mm512_storeu_ps(s + r * Lp + j, v);
      m[r] = _mm512_max_ps(m[r], v);
    }
  }
  if (mx) for (int r = 0; r < QB; ++r) mx[r] = _mm512_reduce_max_ps(m[r]);
}

template <int QB>
static void forward_rows(const Head& hd, const float* const* q, float* s, float* const* o, float* lse) {
  const int64_t Lp = hd.Lp;
  float mx[QB];
  row_dots<QB>(q, hd.kt.data(), hd.bias.data(), Lp, s, mx);
  float l[QB];
  for (int r = 0; r < QB; ++r) {
    const __m512 mv = _mm512_set1_ps(mx[r]);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < Lp; j += 16) {
      const __m512 p = exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(s + r * Lp + j), mv));
      _mm512_storeu_ps(s + r * Lp + j, p);
      sum = _mm512_add_ps(sum, p);
    }
    l[r] = _mm512_reduce_add_ps(sum);
  }
  __m512 acc[QB][2];
  for (int r = 0; r < QB; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t j = 0; j < Lp; j += 2) {
    const __m512 v0 = _mm512_loadu_ps(hd.v.data() + j * 16), v1 = _mm512_loadu_ps(hd.v.data() + (j + 1) * 16);
    for (int r = 0; r < QB; ++r) {
      acc[r][0] = _mm512_fmadd_ps(_mm512_set1_ps(s[r * Lp + j]), v0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(_mm512_set1_ps(s[r * Lp + j + 1]), v1, acc[r][1]);
    }
  }
  for (int r = 0; r < QB; ++r) {
    _mm512_storeu_ps(o[r], _mm512_mul_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_set1_ps(1.f / l[r])));
    lse[r] = mx[r] + std::log2(l[r]);
  }
}

// q, k, v [B, H, L, 16] (last dim contiguous); bias [B, Lk] additive (0 / -inf) or empty.
// Returns out [B, Lq, H, 16] and the base-2 log-sum-exp [B, H, Lq] for the backward.
std::vector<at::Tensor> forward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor bias, double scale) {
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Lk = k.size(2);
  auto out = at::empty({B, Lq, H, 16}, q.options());
  auto lse = at::empty({B, H, Lq}, q.options());
  const float c = (float)(scale * M_LOG2E);
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  float *op = out.data_ptr<float>(), *lp = lse.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    Head hd(Lk);
    std::vector<float> s(4 * hd.Lp);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      hd.load(kp + b * k.stride(0) + h * k.stride(1), k.stride(2), vp + b * v.stride(0) + h * v.stride(1),
              v.stride(2), bp ? bp + b * Lk : nullptr, c);
      const float* qs[4];
      float* os[4];
      int64_t i = 0;
      for (; i < Lq; i += 4) {
        const int n = (int)std::min<int64_t>(4, Lq - i);
        for (int r = 0; r < n; ++r) {
          qs[r] = qp + b * q.stride(0) + h * q.stride(1) + (i + r) * q.stride(2);
          os[r] = op + ((b * Lq + i + r) * H + h) * 16;
        }
        if (n == 4) forward_rows<4>(hd, qs, s.data(), os, lp + bh * Lq + i);
        else for (int r = 0; r < n; ++r) forward_rows<1>(hd, qs + r, s.data(), os + r, lp + bh * Lq + i + r);
      }
    }
  });
  return {out, lse};
}

template <int QB>
static void backward_rows(const Head& hd, const float* const* q, const float* const* g, const float* lse,
                          const float* delta, float* s, float* ds, float* gk, float* gv, float* const* dq, float sc) {
  const int64_t Lp = hd.Lp;
  row_dots<QB>(q, hd.kt.data(), hd.bias.data(), Lp, s, nullptr);   // logits (base 2)
  row_dots<QB>(g, hd.vt.data(), nullptr, Lp, ds, nullptr);          // dP = g . v_j
  for (int r = 0; r < QB; ++r) {
    const __m512 lv = _mm512_set1_ps(lse[r]), dl = _mm512_set1_ps(delta[r]);
    for (int64_t j = 0; j < Lp; j += 16) {
      const __m512 p = exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(s + r * Lp + j), lv));
      _mm512_storeu_ps(s + r * Lp + j, p);
      _mm512_storeu_ps(ds + r * Lp + j, _mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(ds + r * Lp + j), dl)));
    }
  }
  __m512 qv[QB], gvv[QB], dqa[QB];
  for (int r = 0; r < QB; ++r) {
    qv[r] = _mm512_loadu_ps(q[r]); gvv[r] = _mm512_loadu_ps(g[r]); dqa[r] = _mm512_setzero_ps();
  }
  for (int64_t j = 0; j < hd.Lk; ++j) {
    const __m512 kj = _mm512_loadu_ps(hd.k.data() + j * 16);
    __m512 ak = _mm512_loadu_ps(gk + j * 16), av = _mm512_loadu_ps(gv + j * 16);
    for (int r = 0; r < QB; ++r) {
      const __m512 d = _mm512_set1_ps(ds[r * Lp + j]);
      dqa[r] = _mm512_fmadd_ps(d, kj, dqa[r]);
      ak = _mm512_fmadd_ps(d, qv[r], ak);
      av = _mm512_fmadd_ps(_mm512_set1_ps(s[r * Lp + j]), gvv[r], av);
    }
    _mm512_storeu_ps(gk + j * 16, ak);
    _mm512_storeu_ps(gv + j * 16, av);
  }
  for (int r = 0; r < QB; ++r) _mm512_storeu_ps(dq[r], _mm512_mul_ps(dqa[r], _mm512_set1_ps(sc)));
}

// The gradients of q, k, v ([B, H, L, 16], contiguous) from dout and out (any strides with the
// last dim contiguous), recomputing each row's probabilities from the log-sum-exp.
std::vector<at::Tensor> backward(at::Tensor dout, at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor bias,
                                 at::Tensor out, at::Tensor lse, double scale) {
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Lk = k.size(2);
  auto dq = at::empty({B, H, Lq, 16}, q.options());
  auto dk = at::empty({B, H, Lk, 16}, q.options());
  auto dv = at::empty({B, H, Lk, 16}, q.options());
  const float c = (float)(scale * M_LOG2E), sc = (float)scale;
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *gp = dout.data_ptr<float>(), *op = out.data_ptr<float>(), *lp = lse.data_ptr<float>();
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    Head hd(Lk);
    std::vector<float> s(4 * hd.Lp), ds(4 * hd.Lp), gk(hd.Lp * 16), gv(hd.Lp * 16), delta(Lq);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      hd.load(kp + b * k.stride(0) + h * k.stride(1), k.stride(2), vp + b * v.stride(0) + h * v.stride(1),
              v.stride(2), bp ? bp + b * Lk : nullptr, c);
      std::fill(gk.begin(), gk.end(), 0.f);
      std::fill(gv.begin(), gv.end(), 0.f);
      const float *qs[4], *gs[4];
      float* dqs[4];
      for (int64_t i = 0; i < Lq; ++i) {
        const float* gi = gp + b * dout.stride(0) + h * dout.stride(1) + i * dout.stride(2);
        const float* oi = op + b * out.stride(0) + h * out.stride(1) + i * out.stride(2);
        delta[i] = _mm512_reduce_add_ps(_mm512_mul_ps(_mm512_loadu_ps(gi), _mm512_loadu_ps(oi)));
      }
      for (int64_t i = 0; i < Lq; i += 4) {
        const int n = (int)std::min<int64_t>(4, Lq - i);
        for (int r = 0; r < n; ++r) {
          qs[r] = qp + b * q.stride(0) + h * q.stride(1) + (i + r) * q.stride(2);
          gs[r] = gp + b * dout.stride(0) + h * dout.stride(1) + (i + r) * dout.stride(2);
          dqs[r] = dqp + (bh * Lq + i + r) * 16;
        }
        if (n == 4)
          backward_rows<4>(hd, qs, gs, lp + bh * Lq + i, delta.data() + i, s.data(), ds.data(), gk.data(), gv.data(), dqs, sc);
        else
          for (int r = 0; r < n; ++r)
            backward_rows<1>(hd, qs + r, gs + r, lp + bh * Lq + i + r, delta.data() + i + r, s.data(), ds.data(),
                             gk.data(), gv.data(), dqs + r, sc);
      }
      const __m512 scv = _mm512_set1_ps(sc);
      for (int64_t j = 0; j < Lk; ++j) {
        _mm512_storeu_ps(dkp + (bh * Lk + j) * 16, _mm512_mul_ps(_mm512_loadu_ps(gk.data() + j * 16), scv));
        _mm512_storeu_ps(dvp + (bh * Lk + j) * 16, _mm512_loadu_ps(gv.data() + j * 16));
      }
    }
  });
  return {dq, dk, dv};
}

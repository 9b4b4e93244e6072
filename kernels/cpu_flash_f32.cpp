// limner's float32 attention for the CPU, forward only (inference), built at first use by
// kernels/cpu_flash_f32.py (torch.utils.cpp_extension).
//
// out = softmax(q k^T * scale) v for float32 q, k, v [B, H, L, D], no mask. FlashAttention's online
// softmax (Dao et al. 2022), computed transposed: for a block of QB queries and KB keys at a time,
// S^T = K Q^T [keys x queries] and O^T += V^T P^T [D x queries], both oneDNN batch-reduce GEMMs from
// torch's at::native::cpublas. Transposed, the GEMMs' wide dimension is the QB queries (whole
// AVX-512 vectors) instead of the head dim (SD 1.5's 40 fills 2.5 vectors: P V ran at ~70% of
// S's rate), and the softmax's statistics run down the columns, sixteen queries a vector, with no
// horizontal reductions. Q^T (scaled by scale * log2 e) is laid out per task, V^T once per (batch,
// head) in key blocks; rows are padded by 16 floats so that power-of-two strides do not alias in
// cache. The running maximum and sums stay float32, O^T is rescaled only where a column's maximum
// moved, and divided by the sum once at the end. Work is split over (batch, head, query block),
// each task writing only its own rows: deterministic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <vector>

namespace blas = at::native::cpublas;

// q, k, v [B, H, L, D] float32, last dim contiguous. Returns out [B, Lq, H, D] (the caller views it
// as [B, H, Lq, D]). qb: queries a task (a multiple of 16), kb: keys a block.
at::Tensor forward(at::Tensor q, at::Tensor k, at::Tensor v, double scale, int64_t qb, int64_t kb) {
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Lk = k.size(2), D = q.size(3);
  TORCH_CHECK(qb % 16 == 0 && qb > 0 && kb > 0, "cpu_flash_f32: query blocks are whole vectors");
  auto out = at::empty({B, Lq, H, D}, q.options());
  const int64_t nkb = (Lk + kb - 1) / kb, ldv = kb + 16, ldq = qb + 16, per_head = nkb * D * ldv;
  auto packed = at::empty({B * H, per_head}, q.options());  // V^T per key block: [nkb][D][ldv]
  float* pv = packed.data_ptr<float>();
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t qs[3] = {q.stride(0), q.stride(1), q.stride(2)}, ks[3] = {k.stride(0), k.stride(1), k.stride(2)},
                vs[3] = {v.stride(0), v.stride(1), v.stride(2)};
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const float* vrow = vp + bh / H * vs[0] + bh % H * vs[1];
      float* vt = pv + bh * per_head;
      for (int64_t j = 0; j < Lk; ++j)
        for (int64_t d = 0; d < D; ++d) vt[j / kb * D * ldv + d * ldv + j % kb] = vrow[j * vs[2] + d];
    }
  });
  const float c = static_cast<float>(scale) * 1.4426950408889634f;  // softmax in base 2
  const int64_t nqb = (Lq + qb - 1) / qb;
  at::parallel_for(0, B * H * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qt(D * ldq), s(kb * ldq), acc(D * ldq), m(qb), l(qb);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / nqb, i0 = task % nqb * qb, rows = std::min(qb, Lq - i0);
      const int64_t b = bh / H, h = bh % H, cols = (rows + 15) / 16 * 16;  // whole vectors of queries
      const float* qrow = qp + b * qs[0] + h * qs[1] + i0 * qs[2];
      const float* krow = kp + b * ks[0] + h * ks[1];
      const float* vt = pv + bh * per_head;
      for (int64_t d = 0; d < D; ++d) {
        for (int64_t i = 0; i < rows; ++i) qt[d * ldq + i] = qrow[i * qs[2] + d] * c;
        for (int64_t i = rows; i < cols; ++i) qt[d * ldq + i] = 0.f;  // columns past the last query: unused
      }
      std::fill(m.begin(), m.end(), -INFINITY);
      std::fill(l.begin(), l.end(), 0.f);
      for (int64_t blk = 0; blk < nkb; ++blk) {
        const int64_t j0 = blk * kb, n = std::min(kb, Lk - j0);
        blas::brgemm(n, cols, D, ks[2], ldq, ldq, false, krow + j0 * ks[2], qt.data(), s.data());  // S^T
        for (int64_t i = 0; i < cols; i += 16) {
          const __m512 m_old = _mm512_loadu_ps(m.data() + i);
          __m512 mx = m_old;
          for (int64_t j = 0; j < n; ++j) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s.data() + j * ldq + i));
          __m512 sum = _mm512_setzero_ps();
          for (int64_t j = 0; j < n; ++j) {
            const __m512 p = exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(s.data() + j * ldq + i), mx));
            sum = _mm512_add_ps(sum, p);
            _mm512_storeu_ps(s.data() + j * ldq + i, p);
          }
          const __m512 alpha = blk == 0 ? _mm512_setzero_ps() : exp2_ps(_mm512_sub_ps(m_old, mx));
          _mm512_storeu_ps(l.data() + i, _mm512_fmadd_ps(_mm512_loadu_ps(l.data() + i), alpha, sum));
          _mm512_storeu_ps(m.data() + i, mx);
          if (blk > 0 && _mm512_cmp_ps_mask(alpha, _mm512_set1_ps(1.f), _CMP_NEQ_OQ))  // a maximum moved
            for (int64_t d = 0; d < D; ++d) {
              float* a = acc.data() + d * ldq + i;
              _mm512_storeu_ps(a, _mm512_mul_ps(_mm512_loadu_ps(a), alpha));
            }
        }
        blas::brgemm(D, cols, n, ldv, ldq, ldq, blk > 0, vt + blk * D * ldv, s.data(), acc.data());  // O^T
      }
      for (int64_t i = 0; i < rows; ++i) {
        const float inv = 1.f / l[i];
        float* orow = op + ((b * Lq + i0 + i) * H + h) * D;
        for (int64_t d = 0; d < D; ++d) orow[d] = acc[d * ldq + i] * inv;
      }
    }
    blas::brgemm_release(false);
  });
  return out;
}

// limner's bfloat16 attention for the CPU, forward only (inference), built at first use by
// kernels/cpu_flash_bf16.py (torch.utils.cpp_extension; -mavx512bf16).
//
// out = softmax(q k^T * scale) v for bf16 q, k, v [B, H, L, D], D even, Lk a multiple of 32, no mask.
// The online softmax of FlashAttention (Dao et al. 2022): a block of QB query rows meets the keys
// KB at a time; scores S = Q K^T and the update O += P V are oneDNN's batch-reduce GEMMs from
// torch's at::native::cpublas (AMX tiles where the CPU has them, avx512_bf16 elsewhere; bf16 products,
// float32 sums), on keys and values laid out once per (batch, head) in the VNNI form they read.
// Between the two GEMMs one pass finds each row's block maximum and one computes p = 2^(s c - m) (c = scale * log2 e),
// sums it in float32 and stores it as bf16 for P V. The row sums and the running maximum stay
// float32; O accumulates in float32, is rescaled only when a row's maximum moves, and is divided by
// the sum once at the end. The block sizes are measured: with 256 keys a block the scores' GEMM
// writes a block that stays in cache (at head dim 40 it took 35 ms of a 4,096-pixel SD 1.5
// attention with 512, 15 ms with 256). Work is split over (batch, head, query block), each task
// writing only its own rows: deterministic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace blas = at::native::cpublas;
using bf16 = at::BFloat16;

constexpr int64_t QB = 128, KB = 256;  // query rows, keys per block

// 2^x for x <= 0 (the softmax's exponents): 2^round(x) * (degree-3 Taylor polynomial of 2^f),
// f in [-1/2, 1/2], relative error below 6e-4, under bf16's rounding of p (2^-9); far below -126
// vscalefps flushes to 0, as the true value nearly is.
static inline __m512 exp2_neg(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(5.5504108664821580e-2f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// q, k, v [B, H, L, D] bf16, last dim contiguous. Returns out [B, Lq, H, D] (the caller views it
// as [B, H, Lq, D]). Keys and values are laid out once per (batch, head) in the VNNI form the GEMMs
// read (B [K, N] as [K/2][N][2]: two consecutive K rows interleaved): k^T as [D/2][Lk][2] (a key
// block is a column range of it), v as [Lk/2][D][2] (a key block is a row range).
// Keys and values are read two bf16 at a time, so their rows must start on 4-byte boundaries: a
// tensor whose start or outer strides break that (a view at an odd offset) is copied first, here
// rather than in the Python-side check, which a torch.compile trace cannot make (it has no data_ptr()).
static at::Tensor pairs_aligned(const at::Tensor& t) {
  const bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 4 == 0 && t.stride(0) % 2 == 0 &&
                       t.stride(1) % 2 == 0 && t.stride(2) % 2 == 0;
  return aligned ? t : at::empty(t.sizes(), t.options()).copy_(t);  // fresh, contiguous; D even: strides even
}

at::Tensor forward(at::Tensor q, at::Tensor k, at::Tensor v, double scale) {
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Lk = k.size(2), D = q.size(3);
  TORCH_CHECK(D % 2 == 0 && Lk % 32 == 0, "cpu_flash_bf16: head dim must be even and keys a multiple of 32");
  k = pairs_aligned(k);
  v = pairs_aligned(v);
  auto out = at::empty({B, Lq, H, D}, q.options());
  const int64_t nkb = (Lk + KB - 1) / KB, per_head = 2 * Lk * D;
  auto packed = at::empty({B * H, per_head}, q.options());
  bf16* pk = packed.data_ptr<bf16>();
  const bf16 *qp = q.data_ptr<bf16>(), *kp = k.data_ptr<bf16>(), *vp = v.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  const int64_t qs[3] = {q.stride(0), q.stride(1), q.stride(2)}, ks[3] = {k.stride(0), k.stride(1), k.stride(2)},
                vs[3] = {v.stride(0), v.stride(1), v.stride(2)};
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const bf16 *kb = kp + b * ks[0] + h * ks[1], *vb = vp + b * vs[0] + h * vs[1];
      uint32_t* kt = reinterpret_cast<uint32_t*>(pk + bh * per_head);  // [D/2][Lk] pairs
      uint32_t* vv = kt + Lk * D / 2;                                  // [Lk/2][D] pairs
      for (int64_t j = 0; j < Lk; ++j) {
        const uint32_t* row = reinterpret_cast<const uint32_t*>(kb + j * ks[2]);
        for (int64_t d2 = 0; d2 < D / 2; ++d2) kt[d2 * Lk + j] = row[d2];
      }
      for (int64_t j2 = 0; j2 < Lk / 2; ++j2) {
        const uint16_t* r0 = reinterpret_cast<const uint16_t*>(vb + 2 * j2 * vs[2]);
        const uint16_t* r1 = reinterpret_cast<const uint16_t*>(vb + (2 * j2 + 1) * vs[2]);
        for (int64_t d = 0; d < D; ++d) vv[j2 * D + d] = uint32_t(r0[d]) | (uint32_t(r1[d]) << 16);
      }
    }
  });
  const float c = static_cast<float>(scale) * 1.4426950408889634f;
  const int64_t nqb = (Lq + QB - 1) / QB;
  at::parallel_for(0, B * H * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(QB * KB), acc(QB * D), m(QB), l(QB);
    std::vector<bf16> p(QB * KB);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / nqb, i0 = (task % nqb) * QB, rows = std::min(QB, Lq - i0);
      const int64_t b = bh / H, h = bh % H;
      const bf16* qrow = qp + b * qs[0] + h * qs[1] + i0 * qs[2];
      const bf16* head = pk + bh * per_head;
      std::fill(m.begin(), m.end(), -INFINITY);
      std::fill(l.begin(), l.end(), 0.f);
      for (int64_t blk = 0; blk < nkb; ++blk) {
        const int64_t j0 = blk * KB, kb_n = std::min(KB, Lk - j0);
        blas::brgemm(rows, kb_n, D, qs[2], Lk, kb_n, false, qrow, head + 2 * j0, s.data());
        for (int64_t r = 0; r < rows; ++r) {
          float* sr = s.data() + r * kb_n;
          __m512 mx = _mm512_set1_ps(-INFINITY);
          for (int64_t j = 0; j < kb_n; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(sr + j));
          const float m_new = std::max(m[r], _mm512_reduce_max_ps(mx) * c);
          const __m512 vc = _mm512_set1_ps(c), vm = _mm512_set1_ps(-m_new);
          __m512 sum = _mm512_setzero_ps();
          bf16* pr = p.data() + r * kb_n;
          for (int64_t j = 0; j < kb_n; j += 32) {
            const __m512 p0 = exp2_neg(_mm512_fmadd_ps(_mm512_loadu_ps(sr + j), vc, vm));
            const __m512 p1 = exp2_neg(_mm512_fmadd_ps(_mm512_loadu_ps(sr + j + 16), vc, vm));
            sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
            _mm512_storeu_si512(pr + j, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
          }
          const float alpha = blk == 0 ? 0.f : std::exp2(m[r] - m_new);
          l[r] = l[r] * alpha + _mm512_reduce_add_ps(sum);
          m[r] = m_new;
          if (blk > 0 && alpha != 1.f) {  // the running maximum moved: rescale what the row has summed
            float* ar = acc.data() + r * D;
            for (int64_t d = 0; d < D; ++d) ar[d] *= alpha;
          }
        }
        blas::brgemm(rows, D, kb_n, kb_n, D, D, blk > 0, p.data(), head + Lk * D + j0 * D, acc.data());
      }
      for (int64_t r = 0; r < rows; ++r) {
        const float inv = 1.f / l[r];
        bf16* orow = op + ((b * Lq + i0 + r) * H + h) * D;
        const float* ar = acc.data() + r * D;
        for (int64_t d = 0; d < D; ++d) orow[d] = bf16(ar[d] * inv);
      }
    }
    blas::brgemm_release();
  });
  return out;
}

bool available() { return bf16_brgemm_runs(); }

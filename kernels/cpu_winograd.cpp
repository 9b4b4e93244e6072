// Winograd convolution F(m x m, 3 x 3) for float32 and bf16 CPU tensors in channels-last memory (and a
// float32 weight's gradient: weight_grad).
// Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR 2016): an m x m output
// tile of a 3x3 convolution is A^T [(G g G^T) . (B^T d B)] A for its (m+2) x (m+2) input tile d;
// summed over input channels the element-wise product becomes (m+2)^2 independent matrix products
// [tiles, Cin] x [Cin, Cout], (m+2)^2 / (9 m^2) of the direct convolution's multiplications
// (F(2,3): 1/2.25, F(4,3): 1/4). The matrices are Toom-Cook's for interpolation points, each set
// with the point at infinity: F(2,3) the paper's 0, 1, -1; F(4,3) 0, 1, -1, 1/2, -2 rather than the
// paper's 0, +-1, +-2 (Barabasz et al., "Error analysis and improving the accuracy of Winograd
// convolution for deep neural networks", 2020, on choosing the points: about half the error
// here). tests/test_kernels.py checks the convolution against a float64 one. The tiles go in chunks:
// transform the chunk's inputs, one at::bmm, transform its outputs (+ bias) into y, so the
// transformed tensors stay small and in cache while the image can be large (a VAE's 512 px).
// With few channels (forward_fused) each task takes a block of tiles through all three steps
// itself, the products by oneDNN's batch-reduce GEMMs. bf16 (forward_bf16): F(2,3) only, tiles
// and weight transformed in float32 and rounded to bf16 once, products by oneDNN's bf16 GEMMs into
// float32 (AMX tiles or avx512_bf16), outputs rounded to bf16 after the output transform.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <immintrin.h>
#include <algorithm>
#include <exception>
#include <type_traits>
#include <vector>

namespace {

namespace blas = at::native::cpublas;
using bf16 = at::BFloat16;

// sixteen values to and from float32 vectors: float32 as is, bf16 widened (its bits are float32's top
// half) and rounded to nearest even on the way back (avx512_bf16)
static inline __m512 load16(__mmask16 live, const float* p) { return _mm512_maskz_loadu_ps(live, p); }
static inline __m512 load16(__mmask16 live, const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, p)), 16));
}
static inline void store16(float* p, __mmask16 live, __m512 v) { _mm512_mask_storeu_ps(p, live, v); }
static inline void store16(bf16* p, __mmask16 live, __m512 v) {
  _mm256_mask_storeu_epi16(p, live, (__m256i)_mm512_cvtneps_pbh(v));
}

template <int M> struct Mats;
template <> struct Mats<2> {
  static constexpr float BT[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
  static constexpr float G[4][3] = {{1, 0, 0}, {.5f, .5f, .5f}, {.5f, -.5f, .5f}, {0, 0, 1}};
  static constexpr float AT[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
  static constexpr float A_[4][2] = {{1, 0}, {1, 1}, {1, -1}, {0, -1}};  // AT's transpose
  static constexpr float GT[3][4] = {{1, .5f, .5f, 0}, {0, .5f, -.5f, 0}, {0, .5f, .5f, 1}};  // G's transpose
};
template <> struct Mats<4> {  // points 0, 1, -1, 1/2, -2
  static constexpr float BT[6][6] = {{1, -1.5f, -2, 1.5f, 1, 0},   {0, -1, .5f, 2.5f, 1, 0},    {0, 1, -2.5f, .5f, 1, 0},
                                     {0, -2, -1, 2, 1, 0},         {0, .5f, -1, -.5f, 1, 0},   {0, 1, -1.5f, -2, 1.5f, 1}};
  static constexpr float G[6][3] = {{1, 0, 0},
                                    {1.f / 3, 1.f / 3, 1.f / 3},
                                    {-1.f / 3, 1.f / 3, -1.f / 3},
                                    {-16.f / 15, -8.f / 15, -4.f / 15},
                                    {1.f / 15, -2.f / 15, 4.f / 15},
                                    {0, 0, 1}};
  static constexpr float AT[4][6] = {{1, 1, 1, 1, 1, 0}, {0, 1, -1, .5f, -2, 0}, {0, 1, 1, .25f, 4, 0}, {0, 1, -1, .125f, -8, 1}};
  static constexpr float A_[6][4] = {{1, 0, 0, 0}, {1, 1, 1, 1}, {1, -1, 1, -1}, {1, .5f, .25f, .125f}, {1, -2, 4, -8}, {0, 0, 0, 1}};
  static constexpr float GT[3][6] = {{1, 1.f / 3, -1.f / 3, -16.f / 15, 1.f / 15, 0},
                                     {0, 1.f / 3, 1.f / 3, -8.f / 15, -2.f / 15, 0},
                                     {0, 1.f / 3, -1.f / 3, -4.f / 15, 4.f / 15, 1}};
};

// sum_k c[k] * v[k * step], the zero and unit coefficients folded away once the loops unroll
template <int N>
static inline __m512 combine(const float* c, const __m512* v, int step) {
  __m512 s = _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int k = 0; k < N; ++k) {
    if (c[k] == 0.f) continue;
    if (c[k] == 1.f) s = _mm512_add_ps(s, v[k * step]);
    else if (c[k] == -1.f) s = _mm512_sub_ps(s, v[k * step]);
    else s = _mm512_fmadd_ps(_mm512_set1_ps(c[k]), v[k * step], s);
  }
  return s;
}

template <int M, typename T_>
void input_tiles(const T_* x, T_* V, int64_t H, int64_t W, int64_t C, int64_t tH, int64_t tW, int64_t t0, int64_t T, int64_t Tc) {
  constexpr int A = M + 2;
  using Mt = Mats<M>;
  at::parallel_for(0, T, 8, [&](int64_t begin, int64_t end) {
    __m512 d[A * A], t[A * A];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t tile = t0 + r, n = tile / (tH * tW), th = tile / tW % tH, tw = tile % tW;
      for (int64_t c0 = 0; c0 < C; c0 += 16) {
        const __mmask16 live = C - c0 >= 16 ? 0xFFFF : (__mmask16)((1u << (C - c0)) - 1);
#pragma GCC unroll 8
        for (int i = 0; i < A; ++i) {
          const int64_t h = th * M - 1 + i;
#pragma GCC unroll 8
          for (int j = 0; j < A; ++j) {
            const int64_t w = tw * M - 1 + j;
            d[i * A + j] = (h >= 0 && h < H && w >= 0 && w < W)
                               ? load16(live, x + ((n * H + h) * W + w) * C + c0)
                               : _mm512_setzero_ps();
          }
        }
#pragma GCC unroll 8
        for (int i = 0; i < A; ++i)
#pragma GCC unroll 8
          for (int j = 0; j < A; ++j) t[i * A + j] = combine<A>(Mt::BT[i], d + j, A);  // B^T d
#pragma GCC unroll 8
        for (int i = 0; i < A; ++i)
#pragma GCC unroll 8
          for (int j = 0; j < A; ++j)  // (B^T d) B
            store16(V + ((i * A + j) * Tc + r) * C + c0, live, combine<A>(Mt::BT[j], t + i * A, 1));
      }
    }
  });
}

template <int M, typename T_>
void output_tiles(const float* Mm, const float* bias, T_* y, int64_t H, int64_t W, int64_t C,
                  int64_t tH, int64_t tW, int64_t t0, int64_t T, int64_t Tc) {
  constexpr int A = M + 2;
  using Mt = Mats<M>;
  at::parallel_for(0, T, 8, [&](int64_t begin, int64_t end) {
    __m512 m[A * A], t[M * A];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t tile = t0 + r, n = tile / (tH * tW), th = tile / tW % tH, tw = tile % tW;
      for (int64_t c0 = 0; c0 < C; c0 += 16) {
        const __mmask16 live = C - c0 >= 16 ? 0xFFFF : (__mmask16)((1u << (C - c0)) - 1);
        const __m512 b = bias ? _mm512_maskz_loadu_ps(live, bias + c0) : _mm512_setzero_ps();
#pragma GCC unroll 8
        for (int k = 0; k < A * A; ++k) m[k] = _mm512_maskz_loadu_ps(live, Mm + (k * Tc + r) * C + c0);
#pragma GCC unroll 8
        for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
          for (int j = 0; j < A; ++j) t[i * A + j] = combine<A>(Mt::AT[i], m + j, A);  // A^T m
#pragma GCC unroll 8
        for (int i = 0; i < M; ++i) {
          const int64_t h = th * M + i;
          if (h >= H) break;
#pragma GCC unroll 8
          for (int j = 0; j < M; ++j) {
            const int64_t w = tw * M + j;
            if (w >= W) break;
            store16(y + ((n * H + h) * W + w) * C + c0, live,
                    _mm512_add_ps(b, combine<A>(Mt::AT[j], t + i * A, 1)));  // (A^T m) A + bias
          }
        }
      }
    }
  });
}

// The weight gradient (Lavin & Gray 2016, section 5): the forward's m x m output tile is
// A^T Mm A with Mm = U . V summed over input channels, so dL/dMm = A dY A^T for the tile's output
// gradient dY (zero past the image's edge, where the forward wrote nothing), dL/dU[co, ci] =
// sum over tiles of dL/dMm[co] . V[ci] (A*A matrix products [Cout, tiles] x [tiles, Cin]), and
// dL/dg = G^T (dL/dU) G for U = G g G^T.
template <int M>
void grad_tiles(const float* dy, float* D, int64_t H, int64_t W, int64_t C, int64_t tH, int64_t tW, int64_t t0,
                int64_t T, int64_t Tc) {
  constexpr int A = M + 2;
  using Mt = Mats<M>;
  at::parallel_for(0, T, 8, [&](int64_t begin, int64_t end) {
    __m512 d[M * M], t[A * M];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t tile = t0 + r, n = tile / (tH * tW), th = tile / tW % tH, tw = tile % tW;
      for (int64_t c0 = 0; c0 < C; c0 += 16) {
        const __mmask16 live = C - c0 >= 16 ? 0xFFFF : (__mmask16)((1u << (C - c0)) - 1);
#pragma GCC unroll 8
        for (int i = 0; i < M; ++i) {
          const int64_t h = th * M + i;
#pragma GCC unroll 8
          for (int j = 0; j < M; ++j) {
            const int64_t w = tw * M + j;
            d[i * M + j] = h < H && w < W ? load16(live, dy + ((n * H + h) * W + w) * C + c0) : _mm512_setzero_ps();
          }
        }
#pragma GCC unroll 8
        for (int i = 0; i < A; ++i)
#pragma GCC unroll 8
          for (int j = 0; j < M; ++j) t[i * M + j] = combine<M>(Mt::A_[i], d + j, M);  // A dY
#pragma GCC unroll 8
        for (int i = 0; i < A; ++i)
#pragma GCC unroll 8
          for (int j = 0; j < A; ++j)  // (A dY) A^T
            store16(D + ((i * A + j) * Tc + r) * C + c0, live, combine<M>(Mt::A_[j], t + i * M, 1));
      }
    }
  });
}

// dW[co][r][s][ci] = (G^T dU[:, co, ci] G)[r][s] for dU [A*A, Co, Ci]
template <int M>
void weight_grad_tiles(const float* dU, float* dW, int64_t Co, int64_t Ci) {
  constexpr int A = M + 2;
  using Mt = Mats<M>;
  at::parallel_for(0, Co, 4, [&](int64_t begin, int64_t end) {
    __m512 u[A * A], t[3 * A];
    for (int64_t co = begin; co < end; ++co)
      for (int64_t c0 = 0; c0 < Ci; c0 += 16) {
        const __mmask16 live = Ci - c0 >= 16 ? 0xFFFF : (__mmask16)((1u << (Ci - c0)) - 1);
#pragma GCC unroll 8
        for (int k = 0; k < A * A; ++k) u[k] = _mm512_maskz_loadu_ps(live, dU + (k * Co + co) * Ci + c0);
#pragma GCC unroll 3
        for (int r = 0; r < 3; ++r)
#pragma GCC unroll 8
          for (int j = 0; j < A; ++j) t[r * A + j] = combine<A>(Mt::GT[r], u + j, A);  // G^T dU
#pragma GCC unroll 3
        for (int r = 0; r < 3; ++r)
#pragma GCC unroll 3
          for (int s = 0; s < 3; ++s)  // (G^T dU) G
            _mm512_mask_storeu_ps(dW + ((co * 3 + r) * 3 + s) * Ci + c0, live, combine<A>(Mt::GT[s], t + r * A, 1));
      }
  });
}

static const __m512i LANES = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);

// g[k] = w[co, c0 + lane, k / 3, k % 3] for sixteen input channels: float32 gathered at its strides;
// bf16 channels-last loaded side by side, contiguous widened into a block on the stack first (no
// 16-bit gather)
static inline void load_g(const at::Tensor& w, const float* p, int64_t co, int64_t c0, __mmask16 live, __m512* g) {
  const int64_t so = w.stride(0), si = w.stride(1), sh = w.stride(2), sw = w.stride(3);
  const __m512i lanes = _mm512_mullo_epi32(LANES, _mm512_set1_epi32((int)si));
  for (int k = 0; k < 9; ++k) {
    const float* q = p + co * so + c0 * si + (k / 3) * sh + (k % 3) * sw;
    g[k] = si == 1 ? _mm512_maskz_loadu_ps(live, q) : _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, lanes, q, 4);
  }
}
static inline void load_g(const at::Tensor& w, const bf16* p, int64_t co, int64_t c0, __mmask16 live, __m512* g) {
  if (w.stride(1) == 1) {  // channels-last: sixteen input channels side by side
    for (int k = 0; k < 9; ++k) g[k] = load16(live, p + co * w.stride(0) + (k / 3) * w.stride(2) + (k % 3) * w.stride(3) + c0);
    return;
  }
  alignas(64) float block[16 * 9];  // contiguous: [ci][k] as the weight lays them out
  const int64_t n = 9 * __builtin_popcount(live);
  const bf16* q = p + (co * w.size(1) + c0) * 9;
  for (int64_t e = 0; e < n; e += 16)
    _mm512_store_ps(block + e, load16(n - e >= 16 ? 0xFFFF : (__mmask16)((1u << (n - e)) - 1), q + e));
  const __m512i nines = _mm512_mullo_epi32(LANES, _mm512_set1_epi32(9));
  for (int k = 0; k < 9; ++k) g[k] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, nines, block + k, 4);
}

// float32: U[(i*A+j)][co][ci] = (G g G^T)[i][j] for g = w[co, ci]. bf16: the same numbers rounded once,
// in the VNNI form oneDNN's bf16 GEMMs read for their B: U[(i*A+j)][ci/2][co][2] (two input channels
// interleaved), Ci even
template <int M, typename T_>
void weight_tiles(const at::Tensor& w, T_* U, bool ci_major = false) {
  constexpr int A = M + 2;
  using Mt = Mats<M>;
  const int64_t Co = w.size(0), Ci = w.size(1);
  const T_* p = w.data_ptr<T_>();
  auto tiles = [&](int64_t co, int64_t c0) {  // sixteen input channels of one output channel
    __m512 g[9], t[A * 3];
    const __mmask16 live = Ci - c0 >= 16 ? 0xFFFF : (__mmask16)((1u << (Ci - c0)) - 1);
    load_g(w, p, co, c0, live, g);
#pragma GCC unroll 8
    for (int i = 0; i < A; ++i)
#pragma GCC unroll 3
      for (int j = 0; j < 3; ++j) t[i * 3 + j] = combine<3>(Mt::G[i], g + j, 3);  // G g
#pragma GCC unroll 8
    for (int i = 0; i < A; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < A; ++j) {
        const __m512 u = combine<3>(Mt::G[j], t + i * 3, 1);  // (G g) G^T
        if constexpr (std::is_same_v<T_, float>) {
          if (ci_major)  // [A*A][Ci][Co]: sixteen input channels Co apart
            _mm512_mask_i32scatter_ps(U + ((i * A + j) * Ci + c0) * Co + co, live,
                                      _mm512_mullo_epi32(LANES, _mm512_set1_epi32((int)Co)), u, 4);
          else
            _mm512_mask_storeu_ps(U + ((i * A + j) * Co + co) * Ci + c0, live, u);
        } else {  // eight pairs of input channels, Co pairs apart
          const __m256i pairs = (__m256i)_mm512_cvtneps_pbh(u);
          int* base = reinterpret_cast<int*>(U + (i * A + j) * Ci * Co) + (c0 / 2) * Co + co;
          const __m256i at = _mm256_mullo_epi32(_mm512_castsi512_si256(LANES), _mm256_set1_epi32((int)Co));
          _mm256_mask_i32scatter_epi32(base, (__mmask8)((1u << (__builtin_popcount(live) / 2)) - 1), at, pairs, 4);
        }
      }
  };
  if constexpr (std::is_same_v<T_, float>) {  // each (position, output channel) row written front to back
    at::parallel_for(0, Co, 4, [&](int64_t begin, int64_t end) {
      for (int64_t co = begin; co < end; ++co)
        for (int64_t c0 = 0; c0 < Ci; c0 += 16) tiles(co, c0);
    });
  } else {  // sixteen output channels innermost: their pairs fill a cache line while it is hot (3x faster
            // at 1280x1280 than output channels outermost)
    at::parallel_for(0, (Co + 15) / 16, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c0 = 0; c0 < Ci; c0 += 16)
        for (int64_t co = begin * 16; co < std::min(Co, end * 16); ++co) tiles(co, c0);
    });
  }
}

// Mm[p] = V[p] U[p] for the A*A tile positions p, bf16 in, float32 out: oneDNN's batch-reduce GEMM from
// torch's cpublas (AMX tiles or avx512_bf16), over blocks of RB tiles x NB output channels
void gemm_bf16(const bf16* V, const bf16* U, float* Mm, int64_t AA, int64_t n, int64_t Tc, int64_t Ci, int64_t Co) {
  constexpr int64_t RB = 64, NB = 64;
  const int64_t nrb = (n + RB - 1) / RB;
  at::parallel_for(0, AA * nrb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p = task / nrb, r0 = (task % nrb) * RB, rows = std::min(RB, n - r0);
      for (int64_t n0 = 0; n0 < Co; n0 += NB)
        blas::brgemm(rows, std::min(NB, Co - n0), Ci, Ci, Co, Co, false, V + (p * Tc + r0) * Ci,
                     U + p * Ci * Co + 2 * n0, Mm + (p * Tc + r0) * Co + n0);
    }
    blas::brgemm_release();
  });
}

}  // namespace

// [A*A, Cout, Cin] (forward's at::bmm reads its transpose), or with ci_major [A*A, Cin, Cout] (forward_fused's)
at::Tensor weights(at::Tensor w, int64_t m, bool ci_major) {
  TORCH_CHECK(w.dim() == 4 && w.size(2) == 3 && w.size(3) == 3 && w.scalar_type() == at::kFloat, "3x3 float32 weight");
  const int64_t A = m + 2;
  at::Tensor U = ci_major ? at::empty({A * A, w.size(1), w.size(0)}, w.options())
                          : at::empty({A * A, w.size(0), w.size(1)}, w.options());
  if (m == 2) weight_tiles<2>(w, U.data_ptr<float>(), ci_major);
  else if (m == 4) weight_tiles<4>(w, U.data_ptr<float>(), ci_major);
  else TORCH_CHECK(false, "m must be 2 or 4");
  return U;
}

// bf16, F(2x2, 3x3) only: U [16, Ci, Co] holding [16][Ci/2][Co][2]
at::Tensor weights_bf16(at::Tensor w) {
  TORCH_CHECK(w.dim() == 4 && w.size(2) == 3 && w.size(3) == 3 && w.scalar_type() == at::kBFloat16 &&
              (w.is_contiguous() || w.stride(1) == 1) && w.size(1) % 2 == 0,
              "a contiguous or channels-last 3x3 bf16 weight with an even number of input channels");
  at::Tensor U = at::empty({16, w.size(1), w.size(0)}, w.options());
  weight_tiles<2>(w, U.data_ptr<bf16>());
  return U;
}

at::Tensor forward_bf16(at::Tensor x, at::Tensor U, c10::optional<at::Tensor> bias, int64_t chunk) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "a channels-last bf16 input");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Co = U.size(2), tH = (H + 1) / 2, tW = (W + 1) / 2, T = N * tH * tW;
  TORCH_CHECK(U.size(0) == 16 && U.size(1) == C && C % 2 == 0 && U.scalar_type() == at::kBFloat16, "weights of another shape");
  const at::Tensor bc = bias && bias->defined() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* b = bc.defined() ? bc.data_ptr<float>() : nullptr;
  at::Tensor y = at::empty({N, Co, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t Tc = std::min(T, std::max<int64_t>(chunk, 1));
  const int64_t vbytes = (16 * Tc * C * 2 + 63) / 64 * 64;  // bf16 V, then float32 Mm on a cache line
  at::Tensor work = at::empty({vbytes + 16 * Tc * Co * 4}, x.options().dtype(at::kByte));
  bf16* V = reinterpret_cast<bf16*>(work.data_ptr<uint8_t>());
  float* Mm = reinterpret_cast<float*>(work.data_ptr<uint8_t>() + vbytes);
  for (int64_t t0 = 0; t0 < T; t0 += Tc) {
    const int64_t n = std::min(Tc, T - t0);
    input_tiles<2>(x.data_ptr<bf16>(), V, H, W, C, tH, tW, t0, n, Tc);
    gemm_bf16(V, U.data_ptr<bf16>(), Mm, 16, n, Tc, C, Co);
    output_tiles<2>(Mm, b, y.data_ptr<bf16>(), H, W, Co, tH, tW, t0, n, Tc);
  }
  return y;
}

at::Tensor forward(at::Tensor x, at::Tensor U, c10::optional<at::Tensor> bias, int64_t m, int64_t chunk) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "a channels-last float32 input");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), A = m + 2;
  const int64_t Co = U.size(1), tH = (H + m - 1) / m, tW = (W + m - 1) / m, T = N * tH * tW;
  TORCH_CHECK(U.size(0) == A * A && U.size(2) == C, "weights of another shape");
  TORCH_CHECK(m == 2 || m == 4, "m must be 2 or 4");
  const at::Tensor bc = bias && bias->defined() ? bias->contiguous() : at::Tensor();
  const float* b = bc.defined() ? bc.data_ptr<float>() : nullptr;
  at::Tensor y = at::empty({N, Co, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t Tc = std::min(T, std::max<int64_t>(chunk, 1));
  // one buffer for both: over glibc's 32 MB mmap threshold it is a mapping of its own, handed back when
  // freed, where two smaller ones would stay in (and fragment) the heap
  at::Tensor work = at::empty({A * A * Tc * (C + Co)}, x.options());
  at::Tensor V = work.narrow(0, 0, A * A * Tc * C).view({A * A, Tc, C});
  at::Tensor Mm = work.narrow(0, A * A * Tc * C, A * A * Tc * Co).view({A * A, Tc, Co});
  const at::Tensor Ut = U.transpose(1, 2);  // U is [A*A, Cout, Cin]: sixteen input channels a vector
  for (int64_t t0 = 0; t0 < T; t0 += Tc) {
    const int64_t n = std::min(Tc, T - t0);
    at::Tensor v = V.narrow(1, 0, n), mm = Mm.narrow(1, 0, n);
    if (m == 2) input_tiles<2>(x.data_ptr<float>(), V.data_ptr<float>(), H, W, C, tH, tW, t0, n, Tc);
    else input_tiles<4>(x.data_ptr<float>(), V.data_ptr<float>(), H, W, C, tH, tW, t0, n, Tc);
    at::bmm_out(mm, v, Ut);  // the last chunk's is a strided view of the buffer: bmm writes into it
    if (m == 2) output_tiles<2>(Mm.data_ptr<float>(), b, y.data_ptr<float>(), H, W, Co, tH, tW, t0, n, Tc);
    else output_tiles<4>(Mm.data_ptr<float>(), b, y.data_ptr<float>(), H, W, Co, tH, tW, t0, n, Tc);
  }
  return y;
}

// float32, few channels: each task takes RB tiles through all three steps while they stay in its
// cache (input transform, the A*A products as oneDNN batch-reduce GEMMs, output transform), one
// parallel region instead of three and no round trip through memory. U is [A*A, Ci, Co] (row-major
// B of each product).
at::Tensor forward_fused(at::Tensor x, at::Tensor U, c10::optional<at::Tensor> bias, int64_t m, int64_t RB) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "a channels-last float32 input");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), A = m + 2;
  const int64_t Co = U.size(2), tH = (H + m - 1) / m, tW = (W + m - 1) / m, T = N * tH * tW;
  TORCH_CHECK(U.size(0) == A * A && U.size(1) == C && U.is_contiguous(), "weights of another shape");
  TORCH_CHECK(m == 2 || m == 4, "m must be 2 or 4");
  const at::Tensor bc = bias && bias->defined() ? bias->contiguous() : at::Tensor();
  const float* b = bc.defined() ? bc.data_ptr<float>() : nullptr;
  at::Tensor y = at::empty({N, Co, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const float *xp = x.data_ptr<float>(), *up = U.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t nb = (T + RB - 1) / RB;
  at::parallel_for(0, nb, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> V(A * A * RB * C), Mm(A * A * RB * Co);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t t0 = blk * RB, n = std::min(RB, T - t0);
      if (m == 2) input_tiles<2>(xp, V.data(), H, W, C, tH, tW, t0, n, RB);  // nested: runs in this thread
      else input_tiles<4>(xp, V.data(), H, W, C, tH, tW, t0, n, RB);
      for (int64_t p = 0; p < A * A; ++p)
        blas::brgemm(n, Co, C, C, Co, Co, false, V.data() + p * RB * C, up + p * C * Co, Mm.data() + p * RB * Co);
      if (m == 2) output_tiles<2>(Mm.data(), b, yp, H, W, Co, tH, tW, t0, n, RB);
      else output_tiles<4>(Mm.data(), b, yp, H, W, Co, tH, tW, t0, n, RB);
    }
    blas::brgemm_release(false);
  });
  return y;
}

bool bf16_available() { return bf16_brgemm_runs(); }

// The 3x3 weight's gradient of the stride-1, padding-1 convolution of x with output gradient dy (both
// channels-last float32), by F(m x m, 3 x 3): [Cout, Cin, 3, 3] with channels-last strides.
at::Tensor weight_grad(at::Tensor x, at::Tensor dy, int64_t m, int64_t chunk) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.is_contiguous(at::MemoryFormat::ChannelsLast) &&
              dy.dim() == 4 && dy.scalar_type() == at::kFloat && dy.is_contiguous(at::MemoryFormat::ChannelsLast),
              "channels-last float32 input and output gradient");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), A = m + 2, Co = dy.size(1);
  TORCH_CHECK(dy.size(0) == N && dy.size(2) == H && dy.size(3) == W, "an output gradient of the input's size");
  TORCH_CHECK(m == 2 || m == 4, "m must be 2 or 4");
  const int64_t tH = (H + m - 1) / m, tW = (W + m - 1) / m, T = N * tH * tW;
  const int64_t Tc = std::min(T, std::max<int64_t>(chunk, 1));
  at::Tensor work = at::empty({A * A * Tc * (C + Co)}, x.options());
  at::Tensor V = work.narrow(0, 0, A * A * Tc * C).view({A * A, Tc, C});
  at::Tensor D = work.narrow(0, A * A * Tc * C, A * A * Tc * Co).view({A * A, Tc, Co});
  at::Tensor dU = at::zeros({A * A, Co, C}, x.options());
  for (int64_t t0 = 0; t0 < T; t0 += Tc) {
    const int64_t n = std::min(Tc, T - t0);
    if (m == 2) {
      input_tiles<2>(x.data_ptr<float>(), V.data_ptr<float>(), H, W, C, tH, tW, t0, n, Tc);
      grad_tiles<2>(dy.data_ptr<float>(), D.data_ptr<float>(), H, W, Co, tH, tW, t0, n, Tc);
    } else {
      input_tiles<4>(x.data_ptr<float>(), V.data_ptr<float>(), H, W, C, tH, tW, t0, n, Tc);
      grad_tiles<4>(dy.data_ptr<float>(), D.data_ptr<float>(), H, W, Co, tH, tW, t0, n, Tc);
    }
    dU.baddbmm_(D.narrow(1, 0, n).transpose(1, 2), V.narrow(1, 0, n));
  }
  at::Tensor dW = at::empty({Co, 3, 3, C}, x.options());
  if (m == 2) weight_grad_tiles<2>(dU.data_ptr<float>(), dW.data_ptr<float>(), Co, C);
  else weight_grad_tiles<4>(dU.data_ptr<float>(), dW.data_ptr<float>(), Co, C);
  return dW.permute({0, 3, 1, 2});
}

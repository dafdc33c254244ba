// Tensor-core line convolutions (1×k and k×1, "same" padding, stride 1): forward with fused
// BN-normalise/ReLU prologue and bias/ReLU/accumulate/statistics epilogue, and the weight gradient.
//
// Implicit GEMM. A block owns a segment of BM = 64 consecutive pixels along the convolution axis
// (one image line) and BN = 64 output channels. For each chunk of BK input channels it stages the
// segment plus its (K-1)-pixel halo once in shared memory, after applying the prologue; the A
// operand of tap t is the same buffer shifted down t rows, so the input is read from global memory
// once per chunk instead of once per tap. Weights of tap t+1 are loaded while tap t multiplies.
// Four warps each own a 32×32 sub-tile (2×2 wmma fragments, fp32 accumulators).
#include "common.cuh"

namespace msff {
namespace {

using namespace nvcuda;

constexpr int BM = 64;        // pixels per block (GEMM M)
constexpr int BN = 64;        // output channels per block (GEMM N)
constexpr int NTHREADS = 128;  // 4 warps
constexpr int KMAX = 31;      // largest kernel size supported (checked by the glue)

template <typename T>
struct FwdSmem {
  static constexpr int BK = TileCfg<T>::BK;
  static constexpr int LDA = BK + TileCfg<T>::SKEW;
  static constexpr int LDB = BN + TileCfg<T>::SKEW;
  static constexpr int LDC = BN + 4;
  struct Main {
    T a[BM + KMAX - 1][LDA];  // segment + halo, prologue applied
    T b[2][BK][LDB];          // weights of one tap, double-buffered
  };
  struct Epi {
    float c[BM][LDC];   // epilogue staging of the accumulators, then of the first statistic
    float s1[BM][LDC];  // the second statistic
  };
  union Storage {
    Main main;
    Epi epi;
  };
};

template <typename T>
__global__ void __launch_bounds__(NTHREADS) line_conv_fwd_kernel(LineConvParams p) {
  using Cfg = TileCfg<T>;
  using S = FwdSmem<T>;
  using E = typename WmmaElem<T>::type;
  constexpr int BK = Cfg::BK, KF = Cfg::KF, LDA = S::LDA, LDB = S::LDB, LDC = S::LDC;
  __shared__ __align__(128) typename S::Storage smem;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int warp_m = warp % 2, warp_n = warp / 2;

  // Which segment: blockIdx.x = (n * lines + line) * segs + seg.
  const int L = p.axis == 1 ? p.W : p.H;       // length of the convolution axis
  const int lines = p.axis == 1 ? p.H : p.W;   // the other spatial axis
  const int segs = (L + BM - 1) / BM;
  const int64_t bid = blockIdx.x;
  const int seg = static_cast<int>(bid % segs);
  const int line = static_cast<int>((bid / segs) % lines);
  const int n = static_cast<int>(bid / (static_cast<int64_t>(segs) * lines));
  const int co0 = blockIdx.y * BN;
  const int pos0 = seg * BM;
  const int pad = p.K / 2;
  const int R = BM + p.K - 1;  // halo rows

  const T* x = static_cast<const T*>(p.x.ptr);
  const int64_t x_line = p.axis == 1 ? n * p.x.sn + line * p.x.sh : n * p.x.sn + line * p.x.sw;
  const int64_t x_step = p.axis == 1 ? p.x.sw : p.x.sh;
  const bool x_clast = p.x.sc == 1;
  const T* w = static_cast<const T*>(p.w);

  wmma::fragment<wmma::accumulator, 16, 16, KF, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  auto load_b = [&](int buf, int t, int c0) {
    for (int idx = tid; idx < BK * BN; idx += NTHREADS) {
      const int kk = idx / BN, nn = idx % BN;
      const int ci = c0 + kk, co = co0 + nn;
      T v = from_f32<T>(0.0f);
      if (ci < p.Cin && co < p.Cout) v = w[(static_cast<int64_t>(t) * p.Cin + ci) * p.Cout + co];
      smem.main.b[buf][kk][nn] = v;
    }
  };

  for (int c0 = 0; c0 < p.Cin; c0 += BK) {
    __syncthreads();  // the previous chunk's mma reads of a/b are done
    // Stage the segment + halo of BK channels. Coalesce along whichever axis is contiguous.
    for (int idx = tid; idx < R * BK; idx += NTHREADS) {
      int r, cc;
      if (x_clast) {
        r = idx / BK;
        cc = idx % BK;
      } else {
        r = idx % R;
        cc = idx / R;
      }
      const int pos = pos0 + r - pad;
      const int ci = c0 + cc;
      float v = 0.0f;
      if (ci < p.Cin && pos >= 0 && pos < L) {
        v = to_f32(x[x_line + ci * p.x.sc + pos * x_step]);
        if (p.in_scale != nullptr) v = fmaxf(v * p.in_scale[ci] + p.in_shift[ci], 0.0f);
      }
      smem.main.a[r][cc] = from_f32<T>(v);
    }
    load_b(0, 0, c0);
    __syncthreads();
    for (int t = 0; t < p.K; ++t) {
      if (t + 1 < p.K) load_b((t + 1) & 1, t + 1, c0);
      const int buf = t & 1;
#pragma unroll
      for (int kk = 0; kk < BK; kk += KF) {
        wmma::fragment<wmma::matrix_a, 16, 16, KF, E, wmma::row_major> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, KF, E, wmma::row_major> fb[2];
#pragma unroll
        for (int i = 0; i < 2; ++i)
          wmma::load_matrix_sync(fa[i], &smem.main.a[warp_m * 32 + i * 16 + t][kk], LDA);
#pragma unroll
        for (int j = 0; j < 2; ++j)
          wmma::load_matrix_sync(fb[j], &smem.main.b[buf][kk][warp_n * 32 + j * 16], LDB);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            // The 3xTF32 split rewrites its operands in place: use copies.
            auto a = fa[i];
            auto b = fb[j];
            Mma<T>::run(acc[i][j], a, b, p.fp32_mode);
          }
      }
      __syncthreads();  // buffer `buf` is free for tap t+2; `buf^1` is complete for tap t+1
    }
  }

  // Epilogue: stage fp32 accumulators (the union reuses the operand buffers: all warps passed
  // the last __syncthreads of the main loop, or no loop ran at all).
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&smem.epi.c[warp_m * 32 + i * 16][warp_n * 32 + j * 16], acc[i][j], LDC,
                              wmma::mem_row_major);
  __syncthreads();

  T* y = static_cast<T*>(p.y.ptr);
  const T* add = static_cast<const T*>(p.add.ptr);
  const T* gx = static_cast<const T*>(p.gate_x.ptr);
  const bool gate = p.epilogue == Epilogue::kGate;
  // Coalesce along the output's contiguous axis (the gate input, if any, usually shares it).
  const bool y_clast = (y != nullptr ? p.y.sc : (gate ? p.gate_x.sc : p.add.sc)) == 1;
  for (int idx = tid; idx < BM * BN; idx += NTHREADS) {
    int m, nn;
    if (y_clast) {
      m = idx / BN;
      nn = idx % BN;
    } else {
      m = idx % BM;
      nn = idx / BM;
    }
    const int pos = pos0 + m, co = co0 + nn;
    float s0 = 0.0f, s1 = 0.0f;
    if (pos < L && co < p.Cout) {
      const int h = p.axis == 1 ? line : pos;
      const int wq = p.axis == 1 ? pos : line;
      float v = smem.epi.c[m][nn];
      if (!gate) {
        if (p.bias != nullptr) v += p.bias[co];
        if (p.relu) v = fmaxf(v, 0.0f);
        if (add != nullptr) v += to_f32(add[offset4(p.add, n, co, h, wq)]);
        s0 = v;
        s1 = v * v;
      } else {
        const float xg = to_f32(gx[offset4(p.gate_x, n, co, h, wq)]);
        const float sc = p.gate_scale[co];
        const float gm = xg * sc + p.gate_shift[co] > 0.0f ? v : 0.0f;
        s0 = gm * xg;
        s1 = gm;
        v = gm * sc;
      }
      if (y != nullptr) y[offset4(p.y, n, co, h, wq)] = from_f32<T>(v);
    }
    if (p.stat0 != nullptr) {
      smem.epi.c[m][nn] = s0;
      smem.epi.s1[m][nn] = s1;
    }
  }
  if (p.stat0 != nullptr) {
    __syncthreads();
    if (tid < BN && co0 + tid < p.Cout) {
      float a0 = 0.0f, a1 = 0.0f;
      for (int m = 0; m < BM; ++m) {
        a0 += smem.epi.c[m][tid];
        a1 += smem.epi.s1[m][tid];
      }
      atomicAdd(&p.stat0[co0 + tid], static_cast<double>(a0));
      atomicAdd(&p.stat1[co0 + tid], static_cast<double>(a1));
    }
  }
}

// ---- weight gradient -----------------------------------------------------------------------
// A block owns 64 output channels × 32 input channels × a group of 4 taps (one warp per tap) and
// loops over a share of the pixel segments (grid.z splits the pixels). Per segment it stages
// g (64 pixels × 64 channels) and the recomputed activation a (64 + 3 pixels × 32 channels);
// warp w multiplies g^T by a shifted down w rows. Partial sums go to dw with fp32 atomics.
constexpr int WG_CO = 64, WG_CI = 32, WG_TAPS = 4;

template <typename T>
struct WgradSmem {
  static constexpr int SK = TileCfg<T>::SKEW;
  static constexpr int LDG = WG_CO + SK;
  static constexpr int LDH = WG_CI + SK;
  static constexpr int LDC = WG_CI + 4;
  struct Main {
    T g[BM][LDG];
    T a[BM + WG_TAPS - 1][LDH];
  };
  union Storage {
    Main main;
    float c[WG_TAPS][WG_CO][LDC];
  };
};

template <typename T>
__global__ void __launch_bounds__(NTHREADS) line_conv_wgrad_kernel(LineConvWgradParams p) {
  using Cfg = TileCfg<T>;
  using S = WgradSmem<T>;
  using E = typename WmmaElem<T>::type;
  constexpr int KF = Cfg::KF, LDG = S::LDG, LDH = S::LDH, LDC = S::LDC;
  constexpr int RA = BM + WG_TAPS - 1;
  __shared__ __align__(128) typename S::Storage smem;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int tap_groups = (p.K + WG_TAPS - 1) / WG_TAPS;
  const int co_tiles = (p.Cout + WG_CO - 1) / WG_CO;
  const int tg = blockIdx.x % tap_groups;
  const int co0 = (blockIdx.x / tap_groups) % co_tiles * WG_CO;
  const int ci0 = blockIdx.y * WG_CI;
  const int t0 = tg * WG_TAPS;
  const int t = t0 + warp;  // this warp's tap (may be >= K: then it computes nothing useful)
  const int pad = p.K / 2;

  const int L = p.axis == 1 ? p.W : p.H;
  const int lines = p.axis == 1 ? p.H : p.W;
  const int segs = (L + BM - 1) / BM;
  const int64_t total = static_cast<int64_t>(p.N) * lines * segs;
  const T* x = static_cast<const T*>(p.x.ptr);
  const T* g = static_cast<const T*>(p.g.ptr);
  const bool x_clast = p.x.sc == 1, g_clast = p.g.sc == 1;

  wmma::fragment<wmma::accumulator, 16, 16, KF, float> acc[4][2];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  for (int64_t s = blockIdx.z; s < total; s += gridDim.z) {
    const int seg = static_cast<int>(s % segs);
    const int line = static_cast<int>((s / segs) % lines);
    const int n = static_cast<int>(s / (static_cast<int64_t>(segs) * lines));
    const int pos0 = seg * BM;
    const int64_t x_line = p.axis == 1 ? n * p.x.sn + line * p.x.sh : n * p.x.sn + line * p.x.sw;
    const int64_t x_step = p.axis == 1 ? p.x.sw : p.x.sh;
    const int64_t g_line = p.axis == 1 ? n * p.g.sn + line * p.g.sh : n * p.g.sn + line * p.g.sw;
    const int64_t g_step = p.axis == 1 ? p.g.sw : p.g.sh;

    __syncthreads();  // previous segment's fragment loads are done
    for (int idx = tid; idx < BM * WG_CO; idx += NTHREADS) {
      int m, cc;
      if (g_clast) {
        m = idx / WG_CO;
        cc = idx % WG_CO;
      } else {
        m = idx % BM;
        cc = idx / BM;
      }
      const int pos = pos0 + m, co = co0 + cc;
      T v = from_f32<T>(0.0f);
      if (pos < L && co < p.Cout) v = g[g_line + co * p.g.sc + pos * g_step];
      smem.main.g[m][cc] = v;
    }
    for (int idx = tid; idx < RA * WG_CI; idx += NTHREADS) {
      int r, cc;
      if (x_clast) {
        r = idx / WG_CI;
        cc = idx % WG_CI;
      } else {
        r = idx % RA;
        cc = idx / RA;
      }
      // Row r of the staged activation is pixel pos0 + r + t0 - pad; warp w reads rows m + w.
      const int pos = pos0 + r + t0 - pad;
      const int ci = ci0 + cc;
      float v = 0.0f;
      if (ci < p.Cin && pos >= 0 && pos < L) {
        v = to_f32(x[x_line + ci * p.x.sc + pos * x_step]);
        if (p.in_scale != nullptr) v = fmaxf(v * p.in_scale[ci] + p.in_shift[ci], 0.0f);
      }
      smem.main.a[r][cc] = from_f32<T>(v);
    }
    __syncthreads();
    if (t < p.K) {
#pragma unroll
      for (int kk = 0; kk < BM; kk += KF) {
        wmma::fragment<wmma::matrix_a, 16, 16, KF, E, wmma::col_major> fa[4];
        wmma::fragment<wmma::matrix_b, 16, 16, KF, E, wmma::row_major> fb[2];
#pragma unroll
        for (int i = 0; i < 4; ++i) wmma::load_matrix_sync(fa[i], &smem.main.g[kk][i * 16], LDG);
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &smem.main.a[kk + warp][j * 16], LDH);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            auto a = fa[i];
            auto b = fb[j];
            Mma<T>::run(acc[i][j], a, b, p.fp32_mode);
          }
      }
    }
  }

  __syncthreads();
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&smem.c[warp][i * 16][j * 16], acc[i][j], LDC, wmma::mem_row_major);
  __syncthreads();
  // dw is (Cout, Cin, K): tap fastest. Walk taps fastest too, so neighbouring threads hit
  // neighbouring addresses.
  for (int idx = tid; idx < WG_TAPS * WG_CO * WG_CI; idx += NTHREADS) {
    const int w_ = idx % WG_TAPS;
    const int ci_l = (idx / WG_TAPS) % WG_CI;
    const int co_l = idx / (WG_TAPS * WG_CI);
    const int tt = t0 + w_, ci = ci0 + ci_l, co = co0 + co_l;
    if (tt < p.K && ci < p.Cin && co < p.Cout)
      atomicAdd(&p.dw[(static_cast<int64_t>(co) * p.Cin + ci) * p.K + tt], smem.c[w_][co_l][ci_l]);
  }
}

template <typename T>
cudaError_t launch_fwd(const LineConvParams& p, cudaStream_t stream) {
  if (p.K < 1 || p.K > KMAX || p.K % 2 == 0) return cudaErrorInvalidValue;  // halo buffer size
  const int L = p.axis == 1 ? p.W : p.H;
  const int lines = p.axis == 1 ? p.H : p.W;
  const int64_t blocks = static_cast<int64_t>(p.N) * lines * ((L + BM - 1) / BM);
  if (blocks == 0 || p.Cout == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  dim3 grid(static_cast<unsigned>(blocks), (p.Cout + BN - 1) / BN);
  line_conv_fwd_kernel<T><<<grid, NTHREADS, 0, stream>>>(p);
  return last_error();
}

template <typename T>
cudaError_t launch_wgrad(const LineConvWgradParams& p, cudaStream_t stream) {
  if (p.K < 1 || p.K % 2 == 0) return cudaErrorInvalidValue;
  const int L = p.axis == 1 ? p.W : p.H;
  const int lines = p.axis == 1 ? p.H : p.W;
  const int64_t segments = static_cast<int64_t>(p.N) * lines * ((L + BM - 1) / BM);
  if (segments == 0 || p.Cout == 0 || p.Cin == 0) return cudaSuccess;
  const int tap_groups = (p.K + WG_TAPS - 1) / WG_TAPS;
  const int co_tiles = (p.Cout + WG_CO - 1) / WG_CO;
  const int ci_tiles = (p.Cin + WG_CI - 1) / WG_CI;
  const int64_t tiles = static_cast<int64_t>(tap_groups) * co_tiles * ci_tiles;
  // Enough pixel splits for ~4 blocks per SM, but each split keeps >= 8 segments to amortise its
  // atomics; at most 65535 (grid.z limit).
  int64_t splits = (4LL * (p.num_sms > 0 ? p.num_sms : 108) + tiles - 1) / tiles;
  splits = splits < (segments + 7) / 8 ? splits : (segments + 7) / 8;
  splits = splits < 1 ? 1 : (splits > 65535 ? 65535 : splits);
  dim3 grid(static_cast<unsigned>(tap_groups * co_tiles), ci_tiles, static_cast<unsigned>(splits));
  line_conv_wgrad_kernel<T><<<grid, NTHREADS, 0, stream>>>(p);
  return last_error();
}

}  // namespace

cudaError_t line_conv_forward(const LineConvParams& p, cudaStream_t stream) {
  if (p.kernel != ConvKernel::kGeneric) return line_conv_tc_forward(p, stream);
  switch (p.dtype) {
    case DType::kFloat32:
      return launch_fwd<float>(p, stream);
    case DType::kFloat16:
      return launch_fwd<__half>(p, stream);
    case DType::kBFloat16:
      return launch_fwd<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t line_conv_wgrad(const LineConvWgradParams& p, cudaStream_t stream) {
  if (p.kernel != ConvKernel::kGeneric) return line_conv_wgrad_tc(p, stream);
  switch (p.dtype) {
    case DType::kFloat32:
      return launch_wgrad<float>(p, stream);
    case DType::kFloat16:
      return launch_wgrad<__half>(p, stream);
    case DType::kBFloat16:
      return launch_wgrad<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace msff

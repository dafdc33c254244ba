// Tensor-core line convolutions (1×k and k×1, "same" padding, stride 1): forward with fused
// BN-normalise/ReLU prologue and bias/ReLU/accumulate/statistics epilogue, and the weight gradient.
// The generic kernels: every dtype (fp32 through TF32 / 3xTF32), layout and channel count; the
// tensor-core pipelines of line_conv_tc.cu are tried first when MSFF_CUDA_CONV asks for them.
//
// Implicit GEMM. A block owns a segment of BM = 64 consecutive pixels along the convolution axis
// (one image line) and BN = 64 output channels. For each chunk of BK input channels it stages the
// segment plus its (K-1)-pixel halo once in shared memory, applies the prologue there once per
// staged element, and the A operand of tap t is the same buffer shifted down t rows, so the input
// is read from global memory once per chunk instead of once per tap. Weights of tap t+1 are in
// flight while tap t multiplies. Four warps each own a 32×32 sub-tile (2×2 wmma fragments, fp32
// accumulators).
//
// Two instantiations per dtype (template argument V, chosen by line_conv_vector_ok() on the host):
// * V = 16 / sizeof(T) (8 for bf16/fp16, 4 for fp32), the 16-byte path: every operand is staged
//   by cp.async.cg 16-byte copies (LDGSTS.128) of V channels of one pixel; padding rows, channel
//   and output-channel tails are zero-filled by a 0-byte source (src-size 0), never read. The
//   weight taps are double-buffered in cp.async groups, so the copies of tap t+2 run while tap
//   t+1 multiplies. The epilogue reads add / gate_x and writes y as 16-byte vectors too.
// * V = 1, the scalar fallback (NCHW, strided views, channel counts that are not a multiple of V,
//   misaligned bases): element loads along whichever axis is contiguous, as before.
#include <type_traits>

#include "common.cuh"

namespace msff {
namespace {

using namespace nvcuda;

constexpr int BM = 64;        // pixels per block (GEMM M)
constexpr int BN = 64;        // output channels per block (GEMM N)
constexpr int NTHREADS = 128;  // 4 warps
constexpr int KMAX = 31;      // largest kernel size supported (checked by the glue)

// ---- 16-byte copies and vectors -------------------------------------------------------------
// One 16-byte store (st.global.v4: the compiler may otherwise split a uint4 store in four).
__device__ __forceinline__ void st_global_v4(void* p, const uint4& u) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "r"(u.x), "r"(u.y), "r"(u.z), "r"(u.w)
               : "memory");
}

// 16 bytes <-> V = 16 / sizeof(T) floats.
template <typename T>
struct Pack16;
template <typename T>
struct Pack16Half2 {
  static constexpr int V = 8;
  using P2 = typename std::conditional<std::is_same<T, __half>::value, __half2, __nv_bfloat162>::type;
  static __device__ __forceinline__ float2 f2(uint32_t u) {
    const P2 v = *reinterpret_cast<const P2*>(&u);
    if constexpr (std::is_same<T, __half>::value) return __half22float2(v); else return __bfloat1622float2(v);
  }
  static __device__ __forceinline__ uint32_t u32(float a, float b) {
    P2 v;
    if constexpr (std::is_same<T, __half>::value) v = __floats2half2_rn(a, b); else v = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  static __device__ __forceinline__ void unpack(const uint4& u, float* f) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 t = f2(w[j]);
      f[2 * j] = t.x;
      f[2 * j + 1] = t.y;
    }
  }
  static __device__ __forceinline__ uint4 pack(const float* f) {
    return make_uint4(u32(f[0], f[1]), u32(f[2], f[3]), u32(f[4], f[5]), u32(f[6], f[7]));
  }
};
template <>
struct Pack16<__half> : Pack16Half2<__half> {};
template <>
struct Pack16<__nv_bfloat16> : Pack16Half2<__nv_bfloat16> {};
template <>
struct Pack16<float> {
  static constexpr int V = 4;
  static __device__ __forceinline__ void unpack(const uint4& u, float* f) {
    f[0] = __uint_as_float(u.x);
    f[1] = __uint_as_float(u.y);
    f[2] = __uint_as_float(u.z);
    f[3] = __uint_as_float(u.w);
  }
  static __device__ __forceinline__ uint4 pack(const float* f) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
  }
};

template <typename T>
__device__ __forceinline__ void ld16(const T* p, float* f) {  // read-only global, 16-byte aligned
  Pack16<T>::unpack(__ldg(reinterpret_cast<const uint4*>(p)), f);
}
template <typename T>
__device__ __forceinline__ void st16(T* p, const float* f) {  // global, 16-byte aligned
  st_global_v4(p, Pack16<T>::pack(f));
}

// The prologue on one staged 16-byte vector, in place in shared memory:
// s[j] = relu(s[j] * scale[j] + shift[j]) (scale, shift: 16-byte aligned fp32, V of them).
template <typename T>
__device__ __forceinline__ void prologue16(T* s, const float* scale, const float* shift) {
  constexpr int V = Pack16<T>::V;
  uint4* q = reinterpret_cast<uint4*>(s);
  float f[V];
  Pack16<T>::unpack(*q, f);
#pragma unroll
  for (int j = 0; j < V; j += 4) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(scale + j));
    const float4 b = __ldg(reinterpret_cast<const float4*>(shift + j));
    f[j] = fmaxf(f[j] * a.x + b.x, 0.0f);
    f[j + 1] = fmaxf(f[j + 1] * a.y + b.y, 0.0f);
    f[j + 2] = fmaxf(f[j + 2] * a.z + b.z, 0.0f);
    f[j + 3] = fmaxf(f[j + 3] * a.w + b.w, 0.0f);
  }
  *q = Pack16<T>::pack(f);
}

template <typename T>
struct FwdSmem {
  static constexpr int BK = TileCfg<T>::BK;
  static constexpr int LDA = BK + TileCfg<T>::SKEW;
  static constexpr int LDB = BN + TileCfg<T>::SKEW;
  static constexpr int LDC = BN + 4;
  // Rows of a and b are 16-byte multiples (cp.async destinations) and 32-byte multiples (wmma
  // fragment pointers); the union is 128-byte aligned.
  static_assert(LDA * sizeof(T) % 32 == 0 && LDB * sizeof(T) % 32 == 0, "row alignment");
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

template <typename T, int V>
__global__ void __launch_bounds__(NTHREADS) line_conv_fwd_kernel(LineConvParams p) {
  using Cfg = TileCfg<T>;
  using S = FwdSmem<T>;
  using E = typename WmmaElem<T>::type;
  constexpr int BK = Cfg::BK, KF = Cfg::KF, LDA = S::LDA, LDB = S::LDB, LDC = S::LDC;
  static_assert(V == 1 || V == Pack16<T>::V, "V: 1 (scalar) or one 16-byte vector");
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
  const T* w = static_cast<const T*>(p.w);

  wmma::fragment<wmma::accumulator, 16, 16, KF, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  // acc += A (halo rows shifted by t) x B (weights of tap t in buffer buf), BK channels.
  auto mma_tap = [&](int t, int buf) {
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
  };

  if constexpr (V > 1) {
    // ---- 16-byte path. Host guarantees (line_conv_vector_ok): x channels_last with Cin % V == 0
    // and pixel / line / image strides multiples of V from a 16-byte aligned base, Cout % V == 0
    // and w 16-byte aligned, in_scale / in_shift 16-byte aligned. So a V-channel vector of one
    // pixel is one aligned 16-byte copy, and it lies wholly inside or wholly outside [0, Cin)
    // (resp. [0, Cout)): tails are whole zero-filled vectors.
    constexpr int CH = BK / V;  // vectors per staged halo row
    constexpr int WCH = BN / V;  // vectors per staged weight row
    static_assert((BK * WCH) % NTHREADS == 0, "weight copies split evenly over the threads");
    const bool prologue = p.in_scale != nullptr;
    // Copies of the halo rows r in [0, R): pixel pos0 + r - pad, channels c0 + V*cv.
    // A thread always copies the same vector column cv of rows tid / CH, + NTHREADS / CH, ...
    static_assert(NTHREADS % CH == 0 && NTHREADS % WCH == 0, "fixed vector column per thread");
    const int cv = tid % CH;
    auto issue_halo = [&](int c0) {
      for (int r = tid / CH; r < R; r += NTHREADS / CH) {
        const int pos = pos0 + r - pad, ci = c0 + cv * V;
        const bool ok = ci < p.Cin && pos >= 0 && pos < L;
        const T* src = ok ? x + x_line + pos * x_step + ci : x;
        cp_async16(smem_u32(&smem.main.a[r][cv * V]), src, ok);
      }
    };
    // The prologue on exactly the vectors this thread copied (its own cp.async.wait_group made
    // them visible to it), skipping zero-filled ones: padding rows and channel tails stay zero
    // after the prologue, as the convolution's "same" padding requires.
    auto prologue_halo = [&](int c0) {
      for (int r = tid / CH; r < R; r += NTHREADS / CH) {
        const int pos = pos0 + r - pad, ci = c0 + cv * V;
        if (ci < p.Cin && pos >= 0 && pos < L) prologue16<T>(&smem.main.a[r][cv * V], p.in_scale + ci, p.in_shift + ci);
      }
    };
    // Copies of tap t's weights w[t, c0 .. c0+BK, co0 .. co0+BN] into b[buf].
    auto issue_w = [&](int buf, int t, int c0) {
      const int nv = tid % WCH;
#pragma unroll
      for (int i = 0; i < BK * WCH / NTHREADS; ++i) {
        const int kk = tid / WCH + i * (NTHREADS / WCH);
        const int ci = c0 + kk, co = co0 + nv * V;
        const bool ok = ci < p.Cin && co < p.Cout;
        const T* src = ok ? w + (static_cast<int64_t>(t) * p.Cin + ci) * p.Cout + co : w;
        cp_async16(smem_u32(&smem.main.b[buf][kk][nv * V]), src, ok);
      }
    };
    for (int c0 = 0; c0 < p.Cin; c0 += BK) {
      __syncthreads();  // (A) every warp finished reading a and b of the previous chunk
      issue_halo(c0);
      issue_w(0, 0, c0);
      cp_async_commit();  // group: halo + tap 0
      if (p.K > 1) {
        issue_w(1, 1, c0);
        cp_async_commit();  // group: tap 1
        cp_async_wait<1>();  // this thread's halo + tap 0 copies have landed (tap 1 may fly on)
      } else {
        cp_async_wait<0>();
      }
      if (prologue) prologue_halo(c0);
      __syncthreads();  // (B) halo (prologue applied) and tap 0 complete and visible to all
      for (int t = 0; t < p.K; ++t) {
        mma_tap(t, t & 1);
        if (t + 1 < p.K) {
          // The only pending group is tap t+1's (tap t+2 is issued below, after the barrier).
          cp_async_wait<0>();
          __syncthreads();  // (C) tap t+1 visible to all; every warp finished reading b[t & 1]
          if (t + 2 < p.K) {
            issue_w(t & 1, t + 2, c0);  // refill the buffer tap t used: overlaps tap t+1's mma
            cp_async_commit();
          }
        }
      }
      // No copy is pending here: the last tap issued none, and every group was waited for.
    }
  } else {
    // ---- scalar path (any strides): element loads, coalesced along the contiguous axis.
    const bool x_clast = p.x.sc == 1;
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
        mma_tap(t, t & 1);
        __syncthreads();  // buffer t&1 is free for tap t+2; (t+1)&1 is complete for tap t+1
      }
    }
  }

  // Epilogue: stage fp32 accumulators (the union reuses the operand buffers: all warps passed
  // the last barrier of the main loop, no cp.async is pending, or no loop ran at all).
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
  if constexpr (V > 1) {
    // One thread per (pixel, V output channels): y, add and gate_x are channels_last with 16-byte
    // aligned vectors (host-checked), so each is one 16-byte access; a vector is wholly inside or
    // outside [0, Cout).
    constexpr int NV = BN / V;
    for (int idx = tid; idx < BM * NV; idx += NTHREADS) {
      const int m = idx / NV, nn = (idx % NV) * V;
      const int pos = pos0 + m, co = co0 + nn;
      float s0[V], s1[V];
#pragma unroll
      for (int j = 0; j < V; ++j) s0[j] = s1[j] = 0.0f;
      if (pos < L && co < p.Cout) {
        const int h = p.axis == 1 ? line : pos;
        const int wq = p.axis == 1 ? pos : line;
        float v[V];
#pragma unroll
        for (int j = 0; j < V; j += 4) {
          const float4 c4 = *reinterpret_cast<const float4*>(&smem.epi.c[m][nn + j]);
          v[j] = c4.x;
          v[j + 1] = c4.y;
          v[j + 2] = c4.z;
          v[j + 3] = c4.w;
        }
        if (!gate) {
          float ad[V];
          if (add != nullptr) ld16<T>(add + offset4(p.add, n, co, h, wq), ad);
#pragma unroll
          for (int j = 0; j < V; ++j) {
            if (p.bias != nullptr) v[j] += p.bias[co + j];
            if (p.relu) v[j] = fmaxf(v[j], 0.0f);
            if (add != nullptr) v[j] += ad[j];
            s0[j] = v[j];
            s1[j] = v[j] * v[j];
          }
        } else {
          float xg[V];
          ld16<T>(gx + offset4(p.gate_x, n, co, h, wq), xg);
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const float sc = p.gate_scale[co + j];
            const float gm = xg[j] * sc + p.gate_shift[co + j] > 0.0f ? v[j] : 0.0f;
            s0[j] = gm * xg[j];
            s1[j] = gm;
            v[j] = gm * sc;
          }
        }
        if (y != nullptr) st16<T>(y + offset4(p.y, n, co, h, wq), v);
      }
      if (p.stat0 != nullptr) {
#pragma unroll
        for (int j = 0; j < V; j += 4) {
          *reinterpret_cast<float4*>(&smem.epi.c[m][nn + j]) = make_float4(s0[j], s0[j + 1], s0[j + 2], s0[j + 3]);
          *reinterpret_cast<float4*>(&smem.epi.s1[m][nn + j]) = make_float4(s1[j], s1[j + 1], s1[j + 2], s1[j + 3]);
        }
      }
    }
  } else {
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
  }
  if (p.stat0 != nullptr) {
    __syncthreads();
    if (tid < BN && co0 + tid < p.Cout) {
      if (!gate) {
        // Σv, Σv² of this block's pixels as shifted sums (as tile_stats in line_conv_tc.cu): with
        // c = the first pixel's value (pos0 < L: row 0 is always a pixel), S1 = Σ(v - c) and
        // S2 = Σ(v - c)² round relative to the values' spread, not their mean, and
        // Σv = S1 + n c, Σv² = S2 + c (2 S1 + n c) are formed in fp64; the host's
        // M2 = Σv² - (Σv)² / count then keeps its digits when |mean| >> std. Rows past the end
        // of the line are excluded (their staged value is 0, not a pixel).
        const int rows = L - pos0 < BM ? L - pos0 : BM;
        const float c = smem.epi.c[0][tid];
        float a0 = 0.0f, a1 = 0.0f;
        for (int m = 0; m < rows; ++m) {
          const float d = smem.epi.c[m][tid] - c;
          a0 += d;
          a1 = fmaf(d, d, a1);
        }
        const double n = rows, cd = c, s1d = a0;
        atomicAdd(&p.stat0[co0 + tid], s1d + n * cd);
        atomicAdd(&p.stat1[co0 + tid], static_cast<double>(a1) + cd * (2.0 * s1d + n * cd));
      } else {
        // kGate: two plain sums (Σ acc·m·gate_x, Σ acc·m); rows past the end hold zeros.
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
}

// ---- weight gradient -----------------------------------------------------------------------
// A block owns 64 output channels × 32 input channels × a group of 4 taps (one warp per tap) and
// loops over a share of the pixel segments (grid.z splits the pixels). Per segment it stages
// g (64 pixels × 64 channels) and the recomputed activation a (64 + 3 pixels × 32 channels);
// warp w multiplies g^T by a shifted down w rows. Each block writes its fp32 tile to its split's
// slice of the partials (dw's layout; every element of a slice is written by exactly one block),
// and reduce_wgrad_slices (reduce_wgrad_kernel, line_conv_tc.cu) sums the slices in split order:
// deterministic, no atomics (one split writes dw directly).
// The 16-byte path (V > 1) stages both with cp.async and, for 16-bit types, double-buffers them
// across segments so the copies of the next segment run under this one's mma (fp32 keeps one
// stage: two would not fit the 48 KB of static shared memory).
constexpr int WG_CO = 64, WG_CI = 32, WG_TAPS = 4;

template <typename T, int V>
struct WgradSmem {
  static constexpr int SK = TileCfg<T>::SKEW;
  static constexpr int LDG = WG_CO + SK;
  static constexpr int LDH = WG_CI + SK;
  static constexpr int LDC = WG_CI + 4;
  static constexpr int RA = BM + WG_TAPS - 1;
  static constexpr int STAGES = (V > 1 && sizeof(T) == 2) ? 2 : 1;
  static_assert(LDG * sizeof(T) % 32 == 0 && LDH * sizeof(T) % 32 == 0 && (BM * LDG * sizeof(T)) % 32 == 0 &&
                    (RA * LDH * sizeof(T)) % 32 == 0,
                "rows and stages stay 32-byte aligned (wmma pointers, 16-byte cp.async)");
  struct Main {
    T g[STAGES][BM][LDG];
    T a[STAGES][RA][LDH];
  };
  union Storage {
    Main main;
    float c[WG_TAPS][WG_CO][LDC];
  };
};

template <typename T, int V>
__global__ void __launch_bounds__(NTHREADS) line_conv_wgrad_kernel(LineConvWgradParams p) {
  using Cfg = TileCfg<T>;
  using S = WgradSmem<T, V>;
  using E = typename WmmaElem<T>::type;
  constexpr int KF = Cfg::KF, LDG = S::LDG, LDH = S::LDH, LDC = S::LDC, RA = S::RA;
  static_assert(V == 1 || V == Pack16<T>::V, "V: 1 (scalar) or one 16-byte vector");
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
  const int64_t x_step = p.axis == 1 ? p.x.sw : p.x.sh;
  const int64_t g_step = p.axis == 1 ? p.g.sw : p.g.sh;

  // Where segment s starts: its first pixel and the element offsets of its line in x and g.
  struct Seg {
    int pos0;
    int64_t x_line, g_line;
  };
  auto segment = [&](int64_t s) {
    const int seg = static_cast<int>(s % segs);
    const int line = static_cast<int>((s / segs) % lines);
    const int n = static_cast<int>(s / (static_cast<int64_t>(segs) * lines));
    Seg r;
    r.pos0 = seg * BM;
    r.x_line = p.axis == 1 ? n * p.x.sn + line * p.x.sh : n * p.x.sn + line * p.x.sw;
    r.g_line = p.axis == 1 ? n * p.g.sn + line * p.g.sh : n * p.g.sn + line * p.g.sw;
    return r;
  };

  wmma::fragment<wmma::accumulator, 16, 16, KF, float> acc[4][2];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  // acc[i][j] += g^T (64 channels x 64 pixels) x a (pixels shifted by this warp's tap).
  auto mma_segment = [&](int buf) {
    if (t < p.K) {
#pragma unroll
      for (int kk = 0; kk < BM; kk += KF) {
        wmma::fragment<wmma::matrix_a, 16, 16, KF, E, wmma::col_major> fa[4];
        wmma::fragment<wmma::matrix_b, 16, 16, KF, E, wmma::row_major> fb[2];
#pragma unroll
        for (int i = 0; i < 4; ++i) wmma::load_matrix_sync(fa[i], &smem.main.g[buf][kk][i * 16], LDG);
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &smem.main.a[buf][kk + warp][j * 16], LDH);
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
  };

  if constexpr (V > 1) {
    // ---- 16-byte path. Host guarantees (line_conv_wgrad_vector_ok): x and g channels_last,
    // Cin and Cout multiples of V, strides multiples of V, 16-byte aligned bases (and prologue
    // vectors): every V-channel vector of one pixel is one aligned 16-byte copy, wholly inside or
    // outside the channel range. Row r of the staged activation is pixel pos0 + r + t0 - pad.
    constexpr int STAGES = S::STAGES;
    constexpr int GCH = WG_CO / V, ACH = WG_CI / V;
    static_assert((BM * GCH) % NTHREADS == 0, "g copies split evenly over the threads");
    // A thread always copies the same vector columns (NTHREADS is a multiple of GCH and ACH).
    static_assert(NTHREADS % GCH == 0 && NTHREADS % ACH == 0, "fixed vector column per thread");
    const int cv = tid % ACH;
    const bool prologue = p.in_scale != nullptr;
    auto issue = [&](int buf, int64_t s) {
      const Seg sg = segment(s);
      const int gv = tid % GCH;
#pragma unroll
      for (int i = 0; i < BM * GCH / NTHREADS; ++i) {
        const int m = tid / GCH + i * (NTHREADS / GCH);
        const int pos = sg.pos0 + m, co = co0 + gv * V;
        const bool ok = pos < L && co < p.Cout;
        const T* src = ok ? g + sg.g_line + pos * g_step + co : g;
        cp_async16(smem_u32(&smem.main.g[buf][m][gv * V]), src, ok);
      }
      for (int r = tid / ACH; r < RA; r += NTHREADS / ACH) {
        const int pos = sg.pos0 + r + t0 - pad, ci = ci0 + cv * V;
        const bool ok = ci < p.Cin && pos >= 0 && pos < L;
        const T* src = ok ? x + sg.x_line + pos * x_step + ci : x;
        cp_async16(smem_u32(&smem.main.a[buf][r][cv * V]), src, ok);
      }
    };
    // The prologue on this thread's own landed activation vectors, skipping the zero-filled
    // ones (padding rows, channel tail), which must stay zero.
    auto prologue_a = [&](int buf, int64_t s) {
      const int pos0 = segment(s).pos0;
      for (int r = tid / ACH; r < RA; r += NTHREADS / ACH) {
        const int pos = pos0 + r + t0 - pad, ci = ci0 + cv * V;
        if (ci < p.Cin && pos >= 0 && pos < L) prologue16<T>(&smem.main.a[buf][r][cv * V], p.in_scale + ci, p.in_shift + ci);
      }
    };
    int64_t s = blockIdx.z;
    if (STAGES == 2 && s < total) {
      issue(0, s);
      cp_async_commit();
    }
    for (int it = 0; s < total; s += gridDim.z, ++it) {
      const int buf = STAGES == 2 ? (it & 1) : 0;
      if constexpr (STAGES == 2) {
        // Refill the other buffer with the next segment: it was last read by the previous
        // iteration's mma, which every warp finished before that iteration's barrier (D).
        if (s + gridDim.z < total) issue(buf ^ 1, s + gridDim.z);
        cp_async_commit();   // possibly empty: keeps "all but the newest group" = segment s
        cp_async_wait<1>();  // this thread's copies of segment s have landed
      } else {
        issue(0, s);  // buffer 0 is free: barrier (D) of the previous iteration
        cp_async_commit();
        cp_async_wait<0>();
      }
      if (prologue) prologue_a(buf, s);
      __syncthreads();  // (B) segment s staged (prologue applied) by every thread, visible to all
      mma_segment(buf);
      __syncthreads();  // (D) every warp finished reading buffer buf
    }
    cp_async_wait<0>();  // nothing real is pending (the newest group is empty); be explicit
  } else {
    // ---- scalar path (any strides).
    const bool x_clast = p.x.sc == 1, g_clast = p.g.sc == 1;
    for (int64_t s = blockIdx.z; s < total; s += gridDim.z) {
      const Seg sg = segment(s);
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
        const int pos = sg.pos0 + m, co = co0 + cc;
        T v = from_f32<T>(0.0f);
        if (pos < L && co < p.Cout) v = g[sg.g_line + co * p.g.sc + pos * g_step];
        smem.main.g[0][m][cc] = v;
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
        const int pos = sg.pos0 + r + t0 - pad;
        const int ci = ci0 + cc;
        float v = 0.0f;
        if (ci < p.Cin && pos >= 0 && pos < L) {
          v = to_f32(x[sg.x_line + ci * p.x.sc + pos * x_step]);
          if (p.in_scale != nullptr) v = fmaxf(v * p.in_scale[ci] + p.in_shift[ci], 0.0f);
        }
        smem.main.a[0][r][cc] = from_f32<T>(v);
      }
      __syncthreads();
      mma_segment(0);
    }
  }

  __syncthreads();
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&smem.c[warp][i * 16][j * 16], acc[i][j], LDC, wmma::mem_row_major);
  __syncthreads();
  // This split's slice of the partials is (Cout, Cin, K) like dw: tap fastest. Walk taps fastest
  // too, so neighbouring threads hit neighbouring addresses.
  float* part = p.partials + static_cast<int64_t>(blockIdx.z) * p.Cout * p.Cin * p.K;
  for (int idx = tid; idx < WG_TAPS * WG_CO * WG_CI; idx += NTHREADS) {
    const int w_ = idx % WG_TAPS;
    const int ci_l = (idx / WG_TAPS) % WG_CI;
    const int co_l = idx / (WG_TAPS * WG_CI);
    const int tt = t0 + w_, ci = ci0 + ci_l, co = co0 + co_l;
    if (tt < p.K && ci < p.Cin && co < p.Cout)
      part[(static_cast<int64_t>(co) * p.Cin + ci) * p.K + tt] = smem.c[w_][co_l][ci_l];
  }
}


// ---- host side -------------------------------------------------------------------------------
// The 16-byte path's layout rule, written once for every tensor the kernels touch per element:
// channels contiguous (channels_last, sc == 1), channel count and the pixel / line / image
// strides multiples of V, and a 16-byte aligned base, so that V channels of any pixel form one
// aligned 16-byte vector. An absent tensor (null pointer) does not constrain.
template <typename View>
bool vector_view_ok(const View& v, int channels, int V) {
  if (v.ptr == nullptr) return true;
  return v.sc == 1 && channels % V == 0 && v.sw % V == 0 && v.sh % V == 0 && v.sn % V == 0 &&
         reinterpret_cast<uintptr_t>(v.ptr) % 16 == 0;
}
bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }  // null: ok
int vector_width(DType dt) { return dt == DType::kFloat32 ? 4 : 8; }

// Forward / input gradient: x (Cin channels), the (K, Cin, Cout) weight (rows of Cout), y, add
// and gate_x (Cout channels), the prologue's fp32 scale / shift (read V at a time).
bool line_conv_vector_ok(const LineConvParams& p) {
  const int V = vector_width(p.dtype);
  return vector_view_ok(p.x, p.Cin, V) && p.Cout % V == 0 && aligned16(p.w) && vector_view_ok(p.y, p.Cout, V) &&
         vector_view_ok(p.add, p.Cout, V) && (p.epilogue != Epilogue::kGate || vector_view_ok(p.gate_x, p.Cout, V)) &&
         aligned16(p.in_scale) && aligned16(p.in_shift);
}

// Weight gradient: x (Cin channels), g (Cout channels), the prologue's scale / shift.
bool line_conv_wgrad_vector_ok(const LineConvWgradParams& p) {
  const int V = vector_width(p.dtype);
  return vector_view_ok(p.x, p.Cin, V) && vector_view_ok(p.g, p.Cout, V) && aligned16(p.in_scale) &&
         aligned16(p.in_shift);
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
  if (line_conv_vector_ok(p))
    line_conv_fwd_kernel<T, Pack16<T>::V><<<grid, NTHREADS, 0, stream>>>(p);
  else
    line_conv_fwd_kernel<T, 1><<<grid, NTHREADS, 0, stream>>>(p);
  return last_error();
}

// The weight gradient's grid: (tap groups x output-channel tiles, input-channel tiles, pixel
// splits); splits = 0 when there is nothing to launch.
dim3 wgrad_grid(const LineConvWgradParams& p) {
  const int L = p.axis == 1 ? p.W : p.H;
  const int lines = p.axis == 1 ? p.H : p.W;
  const int64_t segments = static_cast<int64_t>(p.N) * lines * ((L + BM - 1) / BM);
  if (segments <= 0 || p.Cout <= 0 || p.Cin <= 0 || p.K < 1) return dim3(0, 0, 0);
  const int tap_groups = (p.K + WG_TAPS - 1) / WG_TAPS;
  const int co_tiles = (p.Cout + WG_CO - 1) / WG_CO;
  const int ci_tiles = (p.Cin + WG_CI - 1) / WG_CI;
  const int64_t tiles = static_cast<int64_t>(tap_groups) * co_tiles * ci_tiles;
  // Enough pixel splits for ~4 blocks per SM, but each split keeps >= 8 segments to amortise its
  // partial tile (written once, then summed); at most 65535 (grid.z limit).
  int64_t splits = (4LL * (p.num_sms > 0 ? p.num_sms : 108) + tiles - 1) / tiles;
  splits = splits < (segments + 7) / 8 ? splits : (segments + 7) / 8;
  splits = splits < 1 ? 1 : (splits > 65535 ? 65535 : splits);
  return dim3(static_cast<unsigned>(tap_groups * co_tiles), ci_tiles, static_cast<unsigned>(splits));
}

template <typename T>
cudaError_t launch_wgrad(const LineConvWgradParams& p_in, cudaStream_t stream) {
  if (p_in.K < 1 || p_in.K % 2 == 0) return cudaErrorInvalidValue;
  const dim3 grid = wgrad_grid(p_in);
  if (grid.z == 0) return cudaSuccess;
  const int64_t elems = static_cast<int64_t>(p_in.Cout) * p_in.Cin * p_in.K;
  LineConvWgradParams p = p_in;
  if (grid.z == 1) {
    p.partials = p.dw;  // one split: its tile is the sum
  } else if (p.partials == nullptr) {
    return cudaErrorInvalidValue;  // the caller sizes it with line_conv_wgrad_generic_partial_elems
  }
  if (line_conv_wgrad_vector_ok(p))
    line_conv_wgrad_kernel<T, Pack16<T>::V><<<grid, NTHREADS, 0, stream>>>(p);
  else
    line_conv_wgrad_kernel<T, 1><<<grid, NTHREADS, 0, stream>>>(p);
  cudaError_t err = last_error();
  if (err != cudaSuccess || grid.z == 1) return err;
  return reduce_wgrad_slices(p.partials, static_cast<int>(grid.z), elems, p.dw, stream);
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

int64_t line_conv_wgrad_generic_partial_elems(const LineConvWgradParams& p) {
  const dim3 grid = wgrad_grid(p);
  if (grid.z <= 1) return 0;  // nothing to launch, or one split written straight into dw
  return static_cast<int64_t>(grid.z) * p.Cout * p.Cin * p.K;
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

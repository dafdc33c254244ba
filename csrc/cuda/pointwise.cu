// Memory-bound parts of the LKAM block: the backward prologue of lk_conv's epilogue and the SE
// attention (pool, excite, scale + residual) with its backward. Each pass reads its inputs once,
// recomputes the cheap activations (BN-affine + ReLU of the raw conv outputs) instead of storing
// them, and folds its channel reductions into the same pass.
//
// Tiling: a block of 256 threads owns TC = 32 channels × TP = 64 pixels of one image. When the
// leading tensor is channels_last, consecutive lanes take consecutive channels (coalesced, and
// shared-memory reductions hit distinct addresses); otherwise consecutive lanes take consecutive
// pixels of one channel (coalesced in NCHW) and reduce with warp shuffles first.
#include "common.cuh"

namespace msff {
namespace {

constexpr int TC = 32, TP = 64, PW_THREADS = 256, PER_THREAD = TC * TP / PW_THREADS;
static_assert(TP % 32 == 0, "a warp must stay within one channel in the NCHW mapping");

struct Elem {
  int c_l, p_l;  // position within the tile
  int c;         // channel
  int h, w;      // pixel
  bool valid;
};

__device__ __forceinline__ Elem tile_elem(int i, bool clast, int C, int H, int W) {
  const int idx = threadIdx.x + i * PW_THREADS;
  Elem e;
  if (clast) {
    e.c_l = idx % TC;
    e.p_l = idx / TC;
  } else {
    e.p_l = idx % TP;
    e.c_l = idx / TP;
  }
  e.c = blockIdx.y * TC + e.c_l;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * TP + e.p_l;
  e.valid = e.c < C && p < static_cast<int64_t>(H) * W;
  e.h = e.valid ? static_cast<int>(p / W) : 0;
  e.w = e.valid ? static_cast<int>(p % W) : 0;
  return e;
}

template <typename T>
__device__ __forceinline__ float ld(const View4& v, int n, const Elem& e) {
  return to_f32(static_cast<const T*>(v.ptr)[offset4(v, n, e.c, e.h, e.w)]);
}

template <typename T>
__device__ __forceinline__ void st(const MutView4& v, int n, const Elem& e, float x) {
  static_cast<T*>(v.ptr)[offset4(v, n, e.c, e.h, e.w)] = from_f32<T>(x);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// red[c_l] += v. Every lane of the warp must call it (invalid elements pass 0).
__device__ __forceinline__ void red_add(float* red, int c_l, float v, bool clast) {
  if (clast) {
    atomicAdd(&red[c_l], v);
  } else {
    v = warp_sum(v);
    if ((threadIdx.x & 31) == 0) atomicAdd(&red[c_l], v);
  }
}

template <int NR>
__device__ __forceinline__ void red_zero(float (&red)[NR][TC]) {
  for (int i = threadIdx.x; i < NR * TC; i += PW_THREADS) red[i / TC][i % TC] = 0.0f;
  __syncthreads();
}

__device__ __forceinline__ void flush_c(const float* red, double* out, int C) {
  const int c = blockIdx.y * TC + threadIdx.x;
  if (out != nullptr && threadIdx.x < TC && c < C) atomicAdd(&out[c], static_cast<double>(red[threadIdx.x]));
}

__device__ __forceinline__ void flush_nc(const float* red, float* out, int n, int C, float mul) {
  const int c = blockIdx.y * TC + threadIdx.x;
  if (out != nullptr && threadIdx.x < TC && c < C)
    atomicAdd(&out[static_cast<int64_t>(n) * C + c], red[threadIdx.x] * mul);
}

// act(t) for one branch; *mask = whether the ReLU passed (true without a scale).
__device__ __forceinline__ float act(float t, const float* s, const float* h, int c, bool* mask) {
  if (s == nullptr) {
    *mask = true;
    return t;
  }
  const float pre = t * s[c] + h[c];
  *mask = pre > 0.0f;
  return *mask ? pre : 0.0f;
}

template <typename T>
__device__ __forceinline__ float branch_sum(const BranchPair& f, int n, const Elem& e) {
  bool m;
  float v = act(ld<T>(f.fa, n, e), f.scale_a, f.shift_a, e.c, &m);
  if (f.fb.ptr != nullptr) v += act(ld<T>(f.fb, n, e), f.scale_b, f.shift_b, e.c, &m);
  return v;
}

// ---- lk_conv backward prologue ----------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(PW_THREADS) lk_conv_bwd_prep_kernel(LkConvBwdPrepParams p) {
  __shared__ float red[1][TC];
  const bool clast = p.grad_y.sc == 1;
  const int n = blockIdx.z;
  if (p.grad_bias != nullptr) red_zero(red);
#pragma unroll
  for (int i = 0; i < PER_THREAD; ++i) {
    const Elem e = tile_elem(i, clast, p.C, p.H, p.W);
    float gr = 0.0f;
    if (e.valid) {
      float g = ld<T>(p.grad_y, n, e);
      const bool need_y = p.grad_sumsq != nullptr || p.relu;
      const float y = need_y ? ld<T>(p.y, n, e) : 0.0f;
      if (p.grad_sum != nullptr) g += p.grad_sum[e.c];
      if (p.grad_sumsq != nullptr) g += 2.0f * y * p.grad_sumsq[e.c];
      if (p.grad_add.ptr != nullptr) st<T>(p.grad_add, n, e, g);
      gr = g;
      if (p.relu) {
        const float r = p.add.ptr != nullptr ? y - ld<T>(p.add, n, e) : y;
        gr = r > 0.0f ? g : 0.0f;
      }
      if (p.g_r.ptr != nullptr) st<T>(p.g_r, n, e, gr);
    }
    if (p.grad_bias != nullptr) red_add(red[0], e.c_l, gr, clast);
  }
  if (p.grad_bias != nullptr) {
    __syncthreads();
    flush_c(red[0], p.grad_bias, p.C);
  }
}

// ---- SE forward -------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(PW_THREADS) se_pool_kernel(SePoolParams p) {
  __shared__ float red[1][TC];
  const bool clast = p.f.fa.sc == 1;
  const int n = blockIdx.z;
  red_zero(red);
#pragma unroll
  for (int i = 0; i < PER_THREAD; ++i) {
    const Elem e = tile_elem(i, clast, p.C, p.H, p.W);
    red_add(red[0], e.c_l, e.valid ? branch_sum<T>(p.f, n, e) : 0.0f, clast);
  }
  __syncthreads();
  flush_nc(red[0], p.pooled, n, p.C, 1.0f / (static_cast<float>(p.H) * p.W));
}

// One block per image: the SE MLP is a pair of tiny GEMVs (C × C/r); CUDA cores suffice.
__global__ void se_excite_kernel(SeExciteParams p) {
  extern __shared__ float sh[];
  float* pooled = sh;        // C
  float* hidden = sh + p.C;  // Hid
  const int n = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int c = threadIdx.x; c < p.C; c += blockDim.x) pooled[c] = p.pooled[static_cast<int64_t>(n) * p.C + c];
  __syncthreads();
  for (int j = warp; j < p.Hid; j += warps) {
    float s = 0.0f;
    for (int c = lane; c < p.C; c += 32) s += p.w1[static_cast<int64_t>(j) * p.C + c] * pooled[c];
    s = warp_sum(s);
    if (lane == 0) hidden[j] = fmaxf(s + p.b1[j], 0.0f);
  }
  __syncthreads();
  for (int c = threadIdx.x; c < p.C; c += blockDim.x) {
    float s = p.b2[c];
    for (int j = 0; j < p.Hid; ++j) s += p.w2[static_cast<int64_t>(c) * p.Hid + j] * hidden[j];
    p.z[static_cast<int64_t>(n) * p.C + c] = 1.0f / (1.0f + __expf(-s));
  }
}

template <typename T>
__global__ void __launch_bounds__(PW_THREADS) se_apply_kernel(SeApplyParams p) {
  const bool clast = p.f.fa.sc == 1;
  const int n = blockIdx.z;
#pragma unroll
  for (int i = 0; i < PER_THREAD; ++i) {
    const Elem e = tile_elem(i, clast, p.C, p.H, p.W);
    if (!e.valid) continue;
    const float f = branch_sum<T>(p.f, n, e);
    float r = ld<T>(p.residual, n, e);
    if (p.res_scale != nullptr) r = r * p.res_scale[e.c] + p.res_shift[e.c];
    st<T>(p.out, n, e, r + f * p.z[static_cast<int64_t>(n) * p.C + e.c]);
  }
}

// ---- SE backward ------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(PW_THREADS) se_bwd_reduce_kernel(SeBwdReduceParams p) {
  __shared__ float red[3][TC];
  const bool clast = p.grad_out.sc == 1;
  const int n = blockIdx.z;
  const bool want_res = p.grad_res_scale != nullptr;
  red_zero(red);
#pragma unroll
  for (int i = 0; i < PER_THREAD; ++i) {
    const Elem e = tile_elem(i, clast, p.C, p.H, p.W);
    float gzf = 0.0f, gres = 0.0f, go_ = 0.0f;
    if (e.valid) {
      go_ = ld<T>(p.grad_out, n, e);
      gzf = go_ * branch_sum<T>(p.f, n, e);
      if (want_res) gres = go_ * ld<T>(p.residual, n, e);
      if (p.grad_residual.ptr != nullptr)
        st<T>(p.grad_residual, n, e, p.res_scale != nullptr ? go_ * p.res_scale[e.c] : go_);
    }
    red_add(red[0], e.c_l, gzf, clast);
    if (want_res) {
      red_add(red[1], e.c_l, gres, clast);
      red_add(red[2], e.c_l, go_, clast);
    }
  }
  __syncthreads();
  flush_nc(red[0], p.gz, n, p.C, 1.0f);
  if (want_res) {
    flush_c(red[1], p.grad_res_scale, p.C);
    flush_c(red[2], p.grad_res_shift, p.C);
  }
}

__global__ void se_mlp_bwd_kernel(SeMlpBwdParams p) {
  extern __shared__ float sh[];
  float* pooled = sh;            // C
  float* gq = sh + p.C;          // C
  float* u = sh + 2 * p.C;       // Hid
  float* gu = u + p.Hid;         // Hid
  const int n = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int64_t row = static_cast<int64_t>(n) * p.C;
  for (int c = threadIdx.x; c < p.C; c += blockDim.x) pooled[c] = p.pooled[row + c];
  __syncthreads();
  for (int j = warp; j < p.Hid; j += warps) {
    float s = 0.0f;
    for (int c = lane; c < p.C; c += 32) s += p.w1[static_cast<int64_t>(j) * p.C + c] * pooled[c];
    s = warp_sum(s);
    if (lane == 0) u[j] = s + p.b1[j];
  }
  __syncthreads();
  for (int c = threadIdx.x; c < p.C; c += blockDim.x) {
    float s = p.b2[c];
    const float* w2c = p.w2 + static_cast<int64_t>(c) * p.Hid;
    for (int j = 0; j < p.Hid; ++j) s += w2c[j] * fmaxf(u[j], 0.0f);
    const float z = 1.0f / (1.0f + __expf(-s));
    const float q = p.gz[row + c] * z * (1.0f - z);
    gq[c] = q;
    atomicAdd(&p.grad_b2[c], q);
    float* gw2c = p.grad_w2 + static_cast<int64_t>(c) * p.Hid;
    for (int j = 0; j < p.Hid; ++j) atomicAdd(&gw2c[j], q * fmaxf(u[j], 0.0f));
  }
  __syncthreads();
  for (int j = warp; j < p.Hid; j += warps) {
    float s = 0.0f;
    for (int c = lane; c < p.C; c += 32) s += gq[c] * p.w2[static_cast<int64_t>(c) * p.Hid + j];
    s = warp_sum(s);
    const float g = u[j] > 0.0f ? s : 0.0f;  // every lane holds the full sum after warp_sum
    if (lane == 0) {
      gu[j] = g;
      atomicAdd(&p.grad_b1[j], g);
    }
    float* gw1j = p.grad_w1 + static_cast<int64_t>(j) * p.C;
    for (int c = lane; c < p.C; c += 32) atomicAdd(&gw1j[c], g * pooled[c]);
  }
  __syncthreads();
  for (int c = threadIdx.x; c < p.C; c += blockDim.x) {
    float s = p.grad_pooled != nullptr ? p.grad_pooled[row + c] : 0.0f;
    for (int j = 0; j < p.Hid; ++j) s += gu[j] * p.w1[static_cast<int64_t>(j) * p.C + c];
    p.gp[row + c] = s;
  }
}

template <typename T>
__global__ void __launch_bounds__(PW_THREADS) se_bwd_apply_kernel(SeBwdApplyParams p) {
  __shared__ float red[4][TC];
  const bool clast = p.grad_out.sc == 1;
  const int n = blockIdx.z;
  const bool red_a = p.grad_scale_a != nullptr, red_b = p.grad_scale_b != nullptr;
  const float inv_hw = 1.0f / (static_cast<float>(p.H) * p.W);
  if (red_a || red_b) red_zero(red);
#pragma unroll
  for (int i = 0; i < PER_THREAD; ++i) {
    const Elem e = tile_elem(i, clast, p.C, p.H, p.W);
    float sa = 0.0f, ha = 0.0f, sb = 0.0f, hb = 0.0f;
    if (e.valid) {
      const int64_t nc = static_cast<int64_t>(n) * p.C + e.c;
      const float gf = ld<T>(p.grad_out, n, e) * p.z[nc] + p.gp[nc] * inv_hw;
      bool m;
      const float ta = ld<T>(p.f.fa, n, e);
      act(ta, p.f.scale_a, p.f.shift_a, e.c, &m);
      const float ga = m ? gf : 0.0f;
      st<T>(p.grad_fa, n, e, p.f.scale_a != nullptr ? ga * p.f.scale_a[e.c] : ga);
      sa = ga * ta;
      ha = ga;
      if (p.f.fb.ptr != nullptr) {
        const float tb = ld<T>(p.f.fb, n, e);
        act(tb, p.f.scale_b, p.f.shift_b, e.c, &m);
        const float gb = m ? gf : 0.0f;
        if (p.grad_fb.ptr != nullptr)
          st<T>(p.grad_fb, n, e, p.f.scale_b != nullptr ? gb * p.f.scale_b[e.c] : gb);
        sb = gb * tb;
        hb = gb;
      }
    }
    if (red_a) {
      red_add(red[0], e.c_l, sa, clast);
      red_add(red[1], e.c_l, ha, clast);
    }
    if (red_b) {
      red_add(red[2], e.c_l, sb, clast);
      red_add(red[3], e.c_l, hb, clast);
    }
  }
  if (red_a || red_b) {
    __syncthreads();
    if (red_a) {
      flush_c(red[0], p.grad_scale_a, p.C);
      flush_c(red[1], p.grad_shift_a, p.C);
    }
    if (red_b) {
      flush_c(red[2], p.grad_scale_b, p.C);
      flush_c(red[3], p.grad_shift_b, p.C);
    }
  }
}

// ---- launchers --------------------------------------------------------------------------------
bool tile_grid(int N, int C, int H, int W, dim3* grid) {
  const int64_t ptiles = (static_cast<int64_t>(H) * W + TP - 1) / TP;
  if (N == 0 || C == 0 || ptiles == 0) return false;
  *grid = dim3(static_cast<unsigned>(ptiles), (C + TC - 1) / TC, N);
  return true;
}

#define MSFF_DISPATCH_DTYPE(DT, KERNEL, GRID, BLOCK, SMEM, STREAM, ARG)        \
  switch (DT) {                                                               \
    case DType::kFloat32:                                                     \
      KERNEL<float><<<GRID, BLOCK, SMEM, STREAM>>>(ARG);                      \
      break;                                                                  \
    case DType::kFloat16:                                                     \
      KERNEL<__half><<<GRID, BLOCK, SMEM, STREAM>>>(ARG);                     \
      break;                                                                  \
    case DType::kBFloat16:                                                    \
      KERNEL<__nv_bfloat16><<<GRID, BLOCK, SMEM, STREAM>>>(ARG);              \
      break;                                                                  \
    default:                                                                  \
      return cudaErrorInvalidValue;                                           \
  }

int mlp_threads(int C) { return C >= 256 ? 256 : (C >= 128 ? 128 : 64); }

}  // namespace

cudaError_t lk_conv_bwd_prep(const LkConvBwdPrepParams& p, cudaStream_t stream) {
  dim3 grid;
  if (!tile_grid(p.N, p.C, p.H, p.W, &grid)) return cudaSuccess;
  MSFF_DISPATCH_DTYPE(p.dtype, lk_conv_bwd_prep_kernel, grid, PW_THREADS, 0, stream, p);
  return last_error();
}

cudaError_t se_pool(const SePoolParams& p, cudaStream_t stream) {
  dim3 grid;
  if (!tile_grid(p.N, p.C, p.H, p.W, &grid)) return cudaSuccess;
  MSFF_DISPATCH_DTYPE(p.dtype, se_pool_kernel, grid, PW_THREADS, 0, stream, p);
  return last_error();
}

cudaError_t se_excite(const SeExciteParams& p, cudaStream_t stream) {
  if (p.N == 0 || p.C == 0) return cudaSuccess;
  const size_t smem = sizeof(float) * (static_cast<size_t>(p.C) + p.Hid);
  if (smem > 48 * 1024) return cudaErrorInvalidValue;  // C + Hid > 12288: checked by the glue
  se_excite_kernel<<<p.N, mlp_threads(p.C), smem, stream>>>(p);
  return last_error();
}

cudaError_t se_apply(const SeApplyParams& p, cudaStream_t stream) {
  dim3 grid;
  if (!tile_grid(p.N, p.C, p.H, p.W, &grid)) return cudaSuccess;
  MSFF_DISPATCH_DTYPE(p.dtype, se_apply_kernel, grid, PW_THREADS, 0, stream, p);
  return last_error();
}

cudaError_t se_bwd_reduce(const SeBwdReduceParams& p, cudaStream_t stream) {
  dim3 grid;
  if (!tile_grid(p.N, p.C, p.H, p.W, &grid)) return cudaSuccess;
  MSFF_DISPATCH_DTYPE(p.dtype, se_bwd_reduce_kernel, grid, PW_THREADS, 0, stream, p);
  return last_error();
}

cudaError_t se_mlp_bwd(const SeMlpBwdParams& p, cudaStream_t stream) {
  if (p.N == 0 || p.C == 0) return cudaSuccess;
  const size_t smem = sizeof(float) * (2 * static_cast<size_t>(p.C) + 2 * static_cast<size_t>(p.Hid));
  if (smem > 48 * 1024) return cudaErrorInvalidValue;
  se_mlp_bwd_kernel<<<p.N, mlp_threads(p.C), smem, stream>>>(p);
  return last_error();
}

cudaError_t se_bwd_apply(const SeBwdApplyParams& p, cudaStream_t stream) {
  dim3 grid;
  if (!tile_grid(p.N, p.C, p.H, p.W, &grid)) return cudaSuccess;
  MSFF_DISPATCH_DTYPE(p.dtype, se_bwd_apply_kernel, grid, PW_THREADS, 0, stream, p);
  return last_error();
}

}  // namespace msff

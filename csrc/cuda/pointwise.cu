// Memory-bound parts of the LKAM block: the backward prologue of lk_conv's epilogue and the SE
// attention (pool, excite, scale + residual) with its backward. Each pass reads its inputs once,
// recomputes the cheap activations (BN-affine + ReLU of the raw conv outputs) instead of storing
// them, and folds its channel reductions into the same pass.
//
// Tiling (csrc/cuda/pointwise_plan.h): a CTA of 256 threads owns PW_TC = 64 channels of one image
// and walks `span` pixels of it in sub-tiles of PW_TP = 256 pixels. Elements move as 16-byte
// vectors of V = 8 (bf16/fp16, unpacked and packed as bf16x2/half2 pairs) or V = 4 (fp32)
// consecutive elements of the contiguous axis: channels when the tensors are channels_last,
// pixels when they are NCHW. pw_layout() (the one place the layout rules live) picks the vector
// path when every tensor of the call is dense inside an image with the same contiguous axis, that
// axis' length is a multiple of V and every base is 16-byte aligned; anything else (strided views,
// odd sizes) runs the same code with V = 1 and general strides.
// Arithmetic is fp32 (the SPEC contract: upcast, compute, round once); per-channel parameters
// (BN scale/shift, z, gp) are staged in shared memory once per CTA.
//
// Reductions are deterministic and free of atomics: each thread sums its elements of a sub-tile in
// fp32, folds them by fixed shuffles into a per-(slot, channel) fp64 accumulator in shared memory
// owned by exactly one lane, the CTA sums its slots in slot order into its own fp64 partial
// (partials[s][n][pblock][c]), and pw_reduce_kernel sums the partials in a fixed order. Run to
// run, the bits are the same. The SE MLP backward writes per-image rows and se_mlp_wgrad_kernel
// sums them over the batch in image order (no float atomics anywhere in this file).
#include <initializer_list>

#include "common.cuh"
#include "pointwise_plan.h"

namespace msff {
namespace {

// Vectors in flight per thread and tensor: the walk unrolls 4 iterations of a sub-tile. CTAs per SM
// the register budget must allow (3 x 8 warps = 24 of 64 warps; with 4 x 16 bytes in flight per
// thread and tensor that covers the HBM latency-bandwidth product).

constexpr int PW_MIN_BLOCKS = 3;

template <typename T>
struct Pair2;
template <>
struct Pair2<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static __device__ __forceinline__ float2 unpack(uint32_t u) {
    return __bfloat1622float2(*reinterpret_cast<const type*>(&u));
  }
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    const type v = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
};
template <>
struct Pair2<__half> {
  using type = __half2;
  static __device__ __forceinline__ float2 unpack(uint32_t u) {
    return __half22float2(*reinterpret_cast<const type*>(&u));
  }
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    const type v = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
};

// One 16-byte store (st.global.v4: the compiler otherwise may split a uint4 store in four).
__device__ __forceinline__ void st_global_v4(void* p, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}

// V consecutive elements <-> V floats. V = 8 (16-bit types) and V = 4 (fp32) are one 16-byte
// access; V = 1 is the scalar fallback.
template <typename T, int V>
struct VecIO {
  static_assert(V == 1, "vector widths: 8 for 16-bit types, 4 for fp32, or 1");
  static __device__ __forceinline__ void load(const T* p, float* f) { f[0] = to_f32<T>(p[0]); }
  static __device__ __forceinline__ void store(T* p, const float* f) { p[0] = from_f32<T>(f[0]); }
};
template <typename T>
struct VecIO<T, 8> {
  static __device__ __forceinline__ void load(const T* p, float* f) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 t = Pair2<T>::unpack(w[j]);
      f[2 * j] = t.x;
      f[2 * j + 1] = t.y;
    }
  }
  static __device__ __forceinline__ void store(T* p, const float* f) {
    st_global_v4(p, Pair2<T>::pack(f[0], f[1]), Pair2<T>::pack(f[2], f[3]), Pair2<T>::pack(f[4], f[5]),
                 Pair2<T>::pack(f[6], f[7]));
  }
};
template <>
struct VecIO<float, 4> {
  static __device__ __forceinline__ void load(const float* p, float* f) {
    const float4 u = __ldg(reinterpret_cast<const float4*>(p));
    f[0] = u.x;
    f[1] = u.y;
    f[2] = u.z;
    f[3] = u.w;
  }
  static __device__ __forceinline__ void store(float* p, const float* f) {
    st_global_v4(p, __float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
  }
};

// The CTA's part of the (N, C, H*W) domain.
struct Tile {
  int n, c0, C, W;
  int64_t p0, p1;  // pixel range [p0, p1) of this CTA
  bool clast;      // channels are the contiguous axis (else pixels)
};

// Where one vector sits: channel c0 + c_l (+ j when channels_last), pixel p (+ j when NCHW).
struct At {
  int c_l;
  int64_t p;
  bool clast;
  __device__ __forceinline__ int pc(int j) const { return clast ? c_l + j : c_l; }  // param index
};

template <int V, typename Vw>
__device__ __forceinline__ int64_t elem_off(const Vw& v, const Tile& t, const At& a) {
  const int64_t c = t.c0 + a.c_l;
  if constexpr (V > 1) {
    return t.n * v.sn + c * v.sc + a.p * v.sw;  // pw_layout: dense pixels (sh == W * sw)
  } else {
    return t.n * v.sn + c * v.sc + (a.p / t.W) * v.sh + (a.p % t.W) * v.sw;
  }
}
template <typename T, int V>
__device__ __forceinline__ void vload(const View4& v, const Tile& t, const At& a, float* f) {
  VecIO<T, V>::load(static_cast<const T*>(v.ptr) + elem_off<V>(v, t, a), f);
}
template <typename T, int V>
__device__ __forceinline__ void vstore(const MutView4& v, const Tile& t, const At& a, const float* f) {
  VecIO<T, V>::store(static_cast<T*>(v.ptr) + elem_off<V>(v, t, a), f);
}

// Shared memory of every pointwise kernel: per-channel parameters of the CTA's channels and the
// fp64 reduction slots.
template <int NS>
struct PwSmem {
  float prm[8][PW_TC];
  double red[NS > 0 ? NS : 1][PW_SLOTS][PW_TC];
};

// prm[i][c_l] = src[c0 + c_l] (0 past C or without src). Every thread must call it.
__device__ __forceinline__ void stage_prm(float* dst, const float* src, int c0, int C) {
  if (src == nullptr) return;
  for (int i = threadIdx.x; i < PW_TC; i += PW_THREADS) dst[i] = c0 + i < C ? src[c0 + i] : 0.0f;
}

template <int NS>
__device__ __forceinline__ Tile begin_tile(PwSmem<NS>& sm, bool clast, int C, int H, int W, int span) {
  Tile t;
  t.n = blockIdx.z;
  t.c0 = blockIdx.y * PW_TC;
  t.C = C;
  t.W = W;
  const int64_t hw = static_cast<int64_t>(H) * W;
  t.p0 = static_cast<int64_t>(blockIdx.x) * span;
  t.p1 = t.p0 + span < hw ? t.p0 + span : hw;
  t.clast = clast;
  if constexpr (NS > 0) {
    double* r = &sm.red[0][0][0];
    for (int i = threadIdx.x; i < NS * PW_SLOTS * PW_TC; i += PW_THREADS) r[i] = 0.0;
  }
  return t;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Walk the tile: body(at, acc) handles one vector and adds its contributions to acc[s][j]. The walk
// folds acc into the CTA's fp64 slots (fixed shuffles, one owner lane per slot).
template <int V, int NS, typename Body>
__device__ __forceinline__ void walk(const Tile& t, PwSmem<NS>& sm, Body&& body) {
  constexpr int NA = NS > 0 ? NS : 1;
  constexpr int ITER = PW_TC * PW_TP / (PW_THREADS * V);
  const int tid = threadIdx.x, lane = tid & 31;
  if (t.clast) {
    constexpr int TR = PW_TC / V;  // threads per pixel row: 8 (bf16/fp16), 16 (fp32), 64 (scalar)
    constexpr int RPP = PW_THREADS / TR;
    const int c_l = (tid % TR) * V;
    const bool c_ok = t.c0 + c_l < t.C;
    for (int64_t ps = t.p0; ps < t.p1; ps += PW_TP) {
      float acc[NA][V];
#pragma unroll
      for (int s = 0; s < NA; ++s)
#pragma unroll
        for (int j = 0; j < V; ++j) acc[s][j] = 0.0f;
#pragma unroll 4
      for (int i = 0; i < ITER; ++i) {
        const At a{c_l, ps + tid / TR + i * RPP, true};
        if (c_ok && a.p < t.p1) body(a, acc);
      }
      if constexpr (NS > 0) {
        const int slot = TR < 32 ? tid >> 5 : tid / TR;
#pragma unroll
        for (int s = 0; s < NS; ++s)
#pragma unroll
          for (int j = 0; j < V; ++j) {
            float v = acc[s][j];
#pragma unroll
            for (int o = TR; o < 32; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (TR >= 32 || lane < TR) sm.red[s][slot][c_l + j] += static_cast<double>(v);
          }
      }
    }
  } else {
    constexpr int TR = PW_TP / V;  // threads per channel row: 32, 64 or 256 (whole warps)
    constexpr int RPP = PW_THREADS / TR;
    const int p_l = (tid % TR) * V;
    const int slot = (tid % TR) >> 5;
    for (int64_t ps = t.p0; ps < t.p1; ps += PW_TP) {
#pragma unroll 4
      for (int i = 0; i < ITER; ++i) {
        const At a{tid / TR + i * RPP, ps + p_l, false};
        float acc[NA][V];
#pragma unroll
        for (int s = 0; s < NA; ++s)
#pragma unroll
          for (int j = 0; j < V; ++j) acc[s][j] = 0.0f;
        if (t.c0 + a.c_l < t.C && a.p < t.p1) body(a, acc);
        if constexpr (NS > 0) {
#pragma unroll
          for (int s = 0; s < NS; ++s) {
            float v = 0.0f;
#pragma unroll
            for (int j = 0; j < V; ++j) v += acc[s][j];
            v = warp_sum(v);
            if (lane == 0) sm.red[s][slot][a.c_l] += static_cast<double>(v);
          }
        }
      }
    }
  }
}

// The CTA's fp64 partial of reduction s, channel c0 + c_l: the slots summed in slot order.
// partials layout: [s][n][pblock][C]. Every thread must call it.
template <int NS>
__device__ __forceinline__ void write_partials(const Tile& t, PwSmem<NS>& sm, double* partials, int64_t elems,
                                               unsigned want_mask) {
  __syncthreads();
  const int c_l = threadIdx.x;
  if (partials == nullptr || c_l >= PW_TC || t.c0 + c_l >= t.C) return;
  const int64_t row = (static_cast<int64_t>(t.n) * gridDim.x + blockIdx.x) * t.C + t.c0 + c_l;
#pragma unroll
  for (int s = 0; s < NS; ++s) {
    if (!((want_mask >> s) & 1u)) continue;
    double d = 0.0;
#pragma unroll
    for (int k = 0; k < PW_SLOTS; ++k) d += sm.red[s][k][c_l];
    partials[s * elems + row] = d;
  }
}

// act(t) of one branch element; *mask = whether the ReLU passed (true without a scale).
__device__ __forceinline__ float act(float t, bool has, float s, float h, bool* mask) {
  if (!has) {
    *mask = true;
    return t;
  }
  const float pre = t * s + h;
  *mask = pre > 0.0f;
  return *mask ? pre : 0.0f;
}

// prm rows of the branch pair: 0 scale_a, 1 shift_a, 2 scale_b, 3 shift_b.
template <int NS>
__device__ __forceinline__ void stage_branch(PwSmem<NS>& sm, const BranchPair& f, int c0, int C) {
  stage_prm(sm.prm[0], f.scale_a, c0, C);
  stage_prm(sm.prm[1], f.shift_a, c0, C);
  stage_prm(sm.prm[2], f.scale_b, c0, C);
  stage_prm(sm.prm[3], f.shift_b, c0, C);
}

template <typename T, int V, int NS>
__device__ __forceinline__ void branch_sum(const BranchPair& f, const PwSmem<NS>& sm, const Tile& t, const At& a,
                                           float* out) {
  float ta[V];
  vload<T, V>(f.fa, t, a, ta);
  const bool ha = f.scale_a != nullptr, hb = f.scale_b != nullptr;
  bool m;
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = act(ta[j], ha, sm.prm[0][a.pc(j)], sm.prm[1][a.pc(j)], &m);
  if (f.fb.ptr != nullptr) {
    float tb[V];
    vload<T, V>(f.fb, t, a, tb);
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] += act(tb[j], hb, sm.prm[2][a.pc(j)], sm.prm[3][a.pc(j)], &m);
  }
}

// ---- lk_conv backward prologue ----------------------------------------------------------------
template <typename T, int V>
__global__ void __launch_bounds__(PW_THREADS, PW_MIN_BLOCKS) lk_conv_bwd_prep_kernel(LkConvBwdPrepParams p) {
  __shared__ PwSmem<1> sm;
  const Tile t = begin_tile(sm, p.grad_y.sc == 1, p.C, p.H, p.W, p.span);
  stage_prm(sm.prm[0], p.grad_sum, t.c0, p.C);
  stage_prm(sm.prm[1], p.grad_sumsq, t.c0, p.C);
  __syncthreads();
  const bool need_y = p.grad_sumsq != nullptr || p.relu;
  walk<V, 1>(t, sm, [&](const At& a, float (&acc)[1][V]) {
    float g[V], y[V], ad[V];
    vload<T, V>(p.grad_y, t, a, g);
    if (need_y) vload<T, V>(p.y, t, a, y);
    if (p.relu && p.add.ptr != nullptr) vload<T, V>(p.add, t, a, ad);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (p.grad_sum != nullptr) g[j] += sm.prm[0][a.pc(j)];
      if (p.grad_sumsq != nullptr) g[j] += 2.0f * y[j] * sm.prm[1][a.pc(j)];
    }
    if (p.grad_add.ptr != nullptr) vstore<T, V>(p.grad_add, t, a, g);
    if (p.relu) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float r = p.add.ptr != nullptr ? y[j] - ad[j] : y[j];
        g[j] = r > 0.0f ? g[j] : 0.0f;
      }
    }
    if (p.g_r.ptr != nullptr) vstore<T, V>(p.g_r, t, a, g);
#pragma unroll
    for (int j = 0; j < V; ++j) acc[0][j] += g[j];
  });
  write_partials(t, sm, p.grad_bias != nullptr ? p.partials : nullptr, p.partial_elems, 1u);
}

// ---- SE forward -------------------------------------------------------------------------------
template <typename T, int V>
__global__ void __launch_bounds__(PW_THREADS, PW_MIN_BLOCKS) se_pool_kernel(SePoolParams p) {
  __shared__ PwSmem<1> sm;
  const Tile t = begin_tile(sm, p.f.fa.sc == 1, p.C, p.H, p.W, p.span);
  stage_branch(sm, p.f, t.c0, p.C);
  __syncthreads();
  walk<V, 1>(t, sm, [&](const At& a, float (&acc)[1][V]) {
    float f[V];
    branch_sum<T, V>(p.f, sm, t, a, f);
#pragma unroll
    for (int j = 0; j < V; ++j) acc[0][j] += f[j];
  });
  write_partials(t, sm, p.partials, p.partial_elems, 1u);
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

// prm rows 4 res_scale, 5 res_shift, 6 z[n], 7 gp[n] (as needed).
template <typename T, int V>
__global__ void __launch_bounds__(PW_THREADS, PW_MIN_BLOCKS) se_apply_kernel(SeApplyParams p) {
  __shared__ PwSmem<0> sm;
  const Tile t = begin_tile(sm, p.f.fa.sc == 1, p.C, p.H, p.W, p.span);
  stage_branch(sm, p.f, t.c0, p.C);
  stage_prm(sm.prm[4], p.res_scale, t.c0, p.C);
  stage_prm(sm.prm[5], p.res_shift, t.c0, p.C);
  stage_prm(sm.prm[6], p.z + static_cast<int64_t>(t.n) * p.C, t.c0, p.C);
  __syncthreads();
  const bool rbn = p.res_scale != nullptr;
  walk<V, 0>(t, sm, [&](const At& a, float (&)[1][V]) {
    float f[V], r[V];
    branch_sum<T, V>(p.f, sm, t, a, f);
    vload<T, V>(p.residual, t, a, r);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int c = a.pc(j);
      const float rr = rbn ? r[j] * sm.prm[4][c] + sm.prm[5][c] : r[j];
      r[j] = rr + f[j] * sm.prm[6][c];
    }
    vstore<T, V>(p.out, t, a, r);
  });
}

// ---- SE backward ------------------------------------------------------------------------------
// Reductions: 0 gz[n, c], 1 grad_res_scale[c], 2 grad_res_shift[c].
template <typename T, int V>
__global__ void __launch_bounds__(PW_THREADS, PW_MIN_BLOCKS) se_bwd_reduce_kernel(SeBwdReduceParams p) {
  __shared__ PwSmem<3> sm;
  const Tile t = begin_tile(sm, p.grad_out.sc == 1, p.C, p.H, p.W, p.span);
  stage_branch(sm, p.f, t.c0, p.C);
  stage_prm(sm.prm[4], p.res_scale, t.c0, p.C);
  __syncthreads();
  const bool want_res = p.grad_res_scale != nullptr;
  walk<V, 3>(t, sm, [&](const At& a, float (&acc)[3][V]) {
    float go[V], f[V];
    vload<T, V>(p.grad_out, t, a, go);
    branch_sum<T, V>(p.f, sm, t, a, f);
    if (want_res) {
      float r[V];
      vload<T, V>(p.residual, t, a, r);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        acc[1][j] += go[j] * r[j];
        acc[2][j] += go[j];
      }
    }
#pragma unroll
    for (int j = 0; j < V; ++j) acc[0][j] += go[j] * f[j];
    if (p.grad_residual.ptr != nullptr) {
      if (p.res_scale != nullptr) {
#pragma unroll
        for (int j = 0; j < V; ++j) go[j] *= sm.prm[4][a.pc(j)];
      }
      vstore<T, V>(p.grad_residual, t, a, go);
    }
  });
  write_partials(t, sm, p.partials, p.partial_elems, want_res ? 7u : 1u);
}

// One block per image: the image's rows of the MLP backward (gq, relu(u), gu) go to scratch;
// se_mlp_wgrad_kernel sums them over the batch in image order (no atomics).
__global__ void se_mlp_bwd_kernel(SeMlpBwdParams p) {
  extern __shared__ float sh[];
  float* pooled = sh;       // C
  float* gq = sh + p.C;     // C
  float* u = sh + 2 * p.C;  // Hid
  const int n = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int64_t row = static_cast<int64_t>(n) * p.C;
  float* q_rows = p.scratch;                                      // (N, C)
  float* v_rows = p.scratch + static_cast<int64_t>(p.N) * p.C;    // (N, Hid): relu(u)
  float* gu_rows = v_rows + static_cast<int64_t>(p.N) * p.Hid;    // (N, Hid)
  for (int c = threadIdx.x; c < p.C; c += blockDim.x) pooled[c] = p.pooled[row + c];
  __syncthreads();
  for (int j = warp; j < p.Hid; j += warps) {
    float s = 0.0f;
    for (int c = lane; c < p.C; c += 32) s += p.w1[static_cast<int64_t>(j) * p.C + c] * pooled[c];
    s = warp_sum(s);
    if (lane == 0) {
      u[j] = s + p.b1[j];
      v_rows[static_cast<int64_t>(n) * p.Hid + j] = fmaxf(u[j], 0.0f);
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < p.C; c += blockDim.x) {
    float s = p.b2[c];
    const float* w2c = p.w2 + static_cast<int64_t>(c) * p.Hid;
    for (int j = 0; j < p.Hid; ++j) s += w2c[j] * fmaxf(u[j], 0.0f);
    const float z = 1.0f / (1.0f + __expf(-s));
    const float q = p.gz[row + c] * z * (1.0f - z);
    gq[c] = q;
    q_rows[row + c] = q;
  }
  __syncthreads();
  float* gu = u + p.Hid;  // Hid
  for (int j = warp; j < p.Hid; j += warps) {
    float s = 0.0f;
    for (int c = lane; c < p.C; c += 32) s += gq[c] * p.w2[static_cast<int64_t>(c) * p.Hid + j];
    s = warp_sum(s);
    if (lane == 0) {
      gu[j] = u[j] > 0.0f ? s : 0.0f;
      gu_rows[static_cast<int64_t>(n) * p.Hid + j] = gu[j];
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < p.C; c += blockDim.x) {
    float s = p.grad_pooled != nullptr ? p.grad_pooled[row + c] : 0.0f;
    for (int j = 0; j < p.Hid; ++j) s += gu[j] * p.w1[static_cast<int64_t>(j) * p.C + c];
    p.gp[row + c] = s;
  }
}

// grad_w2[c, j] = sum_n gq[n, c] v[n, j]; grad_b2[c] = sum_n gq[n, c];
// grad_w1[j, c] = sum_n gu[n, j] pooled[n, c]; grad_b1[j] = sum_n gu[n, j]. One thread per output,
// images summed in order (fp32, as the reference's fp32 weights).
__global__ void se_mlp_wgrad_kernel(SeMlpBwdParams p) {
  const int64_t C = p.C, Hid = p.Hid, N = p.N;
  const float* q = p.scratch;
  const float* v = q + N * C;
  const float* gu = v + N * Hid;
  const int64_t total = 2 * C * Hid + C + Hid;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.0f;
    if (i < C * Hid) {
      const int64_t c = i / Hid, j = i % Hid;
      for (int64_t n = 0; n < N; ++n) s += q[n * C + c] * v[n * Hid + j];
      p.grad_w2[i] = s;
    } else if (i < 2 * C * Hid) {
      const int64_t k = i - C * Hid, j = k / C, c = k % C;
      for (int64_t n = 0; n < N; ++n) s += gu[n * Hid + j] * p.pooled[n * C + c];
      p.grad_w1[k] = s;
    } else if (i < 2 * C * Hid + C) {
      const int64_t c = i - 2 * C * Hid;
      for (int64_t n = 0; n < N; ++n) s += q[n * C + c];
      p.grad_b2[c] = s;
    } else {
      const int64_t j = i - 2 * C * Hid - C;
      for (int64_t n = 0; n < N; ++n) s += gu[n * Hid + j];
      p.grad_b1[j] = s;
    }
  }
}

// Reductions: 0 grad_scale_a, 1 grad_shift_a, 2 grad_scale_b, 3 grad_shift_b (all per channel).
template <typename T, int V>
__global__ void __launch_bounds__(PW_THREADS, PW_MIN_BLOCKS) se_bwd_apply_kernel(SeBwdApplyParams p) {
  __shared__ PwSmem<4> sm;
  const Tile t = begin_tile(sm, p.grad_out.sc == 1, p.C, p.H, p.W, p.span);
  stage_branch(sm, p.f, t.c0, p.C);
  stage_prm(sm.prm[6], p.z + static_cast<int64_t>(t.n) * p.C, t.c0, p.C);
  stage_prm(sm.prm[7], p.gp + static_cast<int64_t>(t.n) * p.C, t.c0, p.C);
  __syncthreads();
  const float inv_hw = 1.0f / (static_cast<float>(p.H) * p.W);
  const bool ha = p.f.scale_a != nullptr, hb = p.f.scale_b != nullptr, has_b = p.f.fb.ptr != nullptr;
  walk<V, 4>(t, sm, [&](const At& a, float (&acc)[4][V]) {
    float go[V], ta[V], g[V];
    vload<T, V>(p.grad_out, t, a, go);
    vload<T, V>(p.f.fa, t, a, ta);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int c = a.pc(j);
      go[j] = go[j] * sm.prm[6][c] + sm.prm[7][c] * inv_hw;  // gF
      bool m;
      act(ta[j], ha, sm.prm[0][c], sm.prm[1][c], &m);
      const float ga = m ? go[j] : 0.0f;
      acc[0][j] += ga * ta[j];
      acc[1][j] += ga;
      g[j] = ha ? ga * sm.prm[0][c] : ga;
    }
    vstore<T, V>(p.grad_fa, t, a, g);
    if (has_b) {
      float tb[V];
      vload<T, V>(p.f.fb, t, a, tb);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int c = a.pc(j);
        bool m;
        act(tb[j], hb, sm.prm[2][c], sm.prm[3][c], &m);
        const float gb = m ? go[j] : 0.0f;
        acc[2][j] += gb * tb[j];
        acc[3][j] += gb;
        g[j] = hb ? gb * sm.prm[2][c] : gb;
      }
      if (p.grad_fb.ptr != nullptr) vstore<T, V>(p.grad_fb, t, a, g);
    }
  });
  write_partials(t, sm, p.partials, p.partial_elems, (ha ? 3u : 0u) | (hb ? 12u : 0u));
}

// out_nc[n, c] = mul * sum_pb part[n, pb, c] (per image), or out_c[c] = sum_{n, pb} part[n, pb, c]:
// 32 slices of the rows per channel, then the slices in slice order (fixed for a shape).
__global__ void __launch_bounds__(1024) pw_reduce_kernel(const double* part, int N, int PB, int C, float* out_nc,
                                                        float mul, double* out_c) {
  __shared__ double sm[32][33];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int c = blockIdx.x * 32 + tx;
  const int64_t rows = out_nc != nullptr ? PB : static_cast<int64_t>(N) * PB;
  const int64_t base = out_nc != nullptr ? static_cast<int64_t>(blockIdx.y) * PB : 0;
  double s = 0.0;
  if (c < C)
    for (int64_t r = ty; r < rows; r += 32) s += part[(base + r) * C + c];
  sm[ty][tx] = s;
  __syncthreads();
  if (ty != 0 || c >= C) return;
  double tot = 0.0;
#pragma unroll
  for (int k = 0; k < 32; ++k) tot += sm[k][tx];
  if (out_nc != nullptr)
    out_nc[static_cast<int64_t>(blockIdx.y) * C + c] = static_cast<float>(tot * mul);
  else
    out_c[c] = tot;
}

// ---- launchers --------------------------------------------------------------------------------
struct Strides {
  const void* ptr;
  int64_t sn, sc, sh, sw;
};
Strides strides_of(const View4& v) { return Strides{v.ptr, v.sn, v.sc, v.sh, v.sw}; }
Strides strides_of(const MutView4& v) { return Strides{v.ptr, v.sn, v.sc, v.sh, v.sw}; }

// The one place the vector-path rules live: every tensor of the call (absent ones are skipped)
// dense inside an image (sh == W * sw) with the lead's contiguous axis (channels when lead.sc == 1,
// else pixels), that axis' length and the other strides multiples of V, 16-byte aligned bases.
bool pw_vector_ok(std::initializer_list<Strides> views, int V, int C, int H, int W) {
  const Strides& lead = *views.begin();
  const bool clast = lead.sc == 1;
  const int64_t hw = static_cast<int64_t>(H) * W;
  if (clast ? C % V != 0 : hw % V != 0) return false;
  for (const Strides& v : views) {
    if (v.ptr == nullptr) continue;
    if (reinterpret_cast<uintptr_t>(v.ptr) % 16 != 0 || v.sh != W * v.sw || v.sn % V != 0) return false;
    if (clast ? (v.sc != 1 || v.sw % V != 0) : (v.sw != 1 || v.sc % V != 0)) return false;
  }
  return true;
}

int elem_bytes(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

// Launch KERNEL<T, V> over the plan's grid: V = 16 / sizeof(T) when `vec`, else 1.
#define MSFF_PW_LAUNCH(DT, VEC, KERNEL, GRID, STREAM, ARG)                       \
  switch (DT) {                                                                 \
    case DType::kFloat32:                                                       \
      if (VEC)                                                                  \
        KERNEL<float, 4><<<GRID, PW_THREADS, 0, STREAM>>>(ARG);                 \
      else                                                                      \
        KERNEL<float, 1><<<GRID, PW_THREADS, 0, STREAM>>>(ARG);                 \
      break;                                                                    \
    case DType::kFloat16:                                                       \
      if (VEC)                                                                  \
        KERNEL<__half, 8><<<GRID, PW_THREADS, 0, STREAM>>>(ARG);                \
      else                                                                      \
        KERNEL<__half, 1><<<GRID, PW_THREADS, 0, STREAM>>>(ARG);                \
      break;                                                                    \
    case DType::kBFloat16:                                                      \
      if (VEC)                                                                  \
        KERNEL<__nv_bfloat16, 8><<<GRID, PW_THREADS, 0, STREAM>>>(ARG);         \
      else                                                                      \
        KERNEL<__nv_bfloat16, 1><<<GRID, PW_THREADS, 0, STREAM>>>(ARG);         \
      break;                                                                    \
    default:                                                                    \
      return cudaErrorInvalidValue;                                             \
  }

// Plan the grid and fill the plan fields of q; false: nothing to launch.
template <typename P>
bool pw_prepare(P* q, dim3* grid) {
  const PwPlan pl = pw_plan(q->N, q->C, q->H, q->W);
  if (pl.ctiles == 0) return false;
  q->span = pl.span;
  q->partial_elems = pl.partial_elems;
  *grid = dim3(static_cast<unsigned>(pl.pblocks), static_cast<unsigned>(pl.ctiles), static_cast<unsigned>(q->N));
  return true;
}

cudaError_t reduce_partial(const double* part, int s, int64_t elems, int N, int PB, int C, float* out_nc, float mul,
                           double* out_c, cudaStream_t stream) {
  const dim3 grid((C + 31) / 32, out_nc != nullptr ? N : 1);
  pw_reduce_kernel<<<grid, dim3(32, 32), 0, stream>>>(part + s * elems, N, PB, C, out_nc, mul, out_c);
  return last_error();
}

int mlp_threads(int C) { return C >= 256 ? 256 : (C >= 128 ? 128 : 64); }

}  // namespace

cudaError_t lk_conv_bwd_prep(const LkConvBwdPrepParams& p_in, cudaStream_t stream) {
  LkConvBwdPrepParams p = p_in;
  dim3 grid;
  if (!pw_prepare(&p, &grid)) return cudaSuccess;
  if (p.grad_bias != nullptr && p.partials == nullptr) return cudaErrorInvalidValue;
  const bool vec = pw_vector_ok({strides_of(p.grad_y), strides_of(p.y), strides_of(p.add), strides_of(p.g_r),
                                 strides_of(p.grad_add)},
                                16 / elem_bytes(p.dtype), p.C, p.H, p.W);
  MSFF_PW_LAUNCH(p.dtype, vec, lk_conv_bwd_prep_kernel, grid, stream, p);
  cudaError_t err = last_error();
  if (err != cudaSuccess || p.grad_bias == nullptr) return err;
  return reduce_partial(p.partials, 0, p.partial_elems, p.N, grid.x, p.C, nullptr, 1.0f, p.grad_bias, stream);
}

cudaError_t se_pool(const SePoolParams& p_in, cudaStream_t stream) {
  SePoolParams p = p_in;
  dim3 grid;
  if (!pw_prepare(&p, &grid)) return cudaSuccess;
  if (p.partials == nullptr) return cudaErrorInvalidValue;
  const bool vec = pw_vector_ok({strides_of(p.f.fa), strides_of(p.f.fb)}, 16 / elem_bytes(p.dtype), p.C, p.H, p.W);
  MSFF_PW_LAUNCH(p.dtype, vec, se_pool_kernel, grid, stream, p);
  const cudaError_t err = last_error();
  if (err != cudaSuccess) return err;
  return reduce_partial(p.partials, 0, p.partial_elems, p.N, grid.x, p.C, p.pooled,
                        1.0f / (static_cast<float>(p.H) * p.W), nullptr, stream);
}

cudaError_t se_excite(const SeExciteParams& p, cudaStream_t stream) {
  if (p.N == 0 || p.C == 0) return cudaSuccess;
  const size_t smem = sizeof(float) * (static_cast<size_t>(p.C) + p.Hid);
  if (smem > 48 * 1024) return cudaErrorInvalidValue;  // C + Hid > 12288: checked by the glue
  se_excite_kernel<<<p.N, mlp_threads(p.C), smem, stream>>>(p);
  return last_error();
}

cudaError_t se_apply(const SeApplyParams& p_in, cudaStream_t stream) {
  SeApplyParams p = p_in;
  dim3 grid;
  if (!pw_prepare(&p, &grid)) return cudaSuccess;
  const bool vec = pw_vector_ok({strides_of(p.f.fa), strides_of(p.f.fb), strides_of(p.residual), strides_of(p.out)},
                                16 / elem_bytes(p.dtype), p.C, p.H, p.W);
  MSFF_PW_LAUNCH(p.dtype, vec, se_apply_kernel, grid, stream, p);
  return last_error();
}

cudaError_t se_bwd_reduce(const SeBwdReduceParams& p_in, cudaStream_t stream) {
  SeBwdReduceParams p = p_in;
  dim3 grid;
  if (!pw_prepare(&p, &grid)) return cudaSuccess;
  if (p.partials == nullptr) return cudaErrorInvalidValue;
  const bool vec = pw_vector_ok({strides_of(p.grad_out), strides_of(p.f.fa), strides_of(p.f.fb),
                                 strides_of(p.residual), strides_of(p.grad_residual)},
                                16 / elem_bytes(p.dtype), p.C, p.H, p.W);
  MSFF_PW_LAUNCH(p.dtype, vec, se_bwd_reduce_kernel, grid, stream, p);
  cudaError_t err = last_error();
  if (err != cudaSuccess) return err;
  err = reduce_partial(p.partials, 0, p.partial_elems, p.N, grid.x, p.C, p.gz, 1.0f, nullptr, stream);
  if (err != cudaSuccess || p.grad_res_scale == nullptr) return err;
  err = reduce_partial(p.partials, 1, p.partial_elems, p.N, grid.x, p.C, nullptr, 1.0f, p.grad_res_scale, stream);
  if (err != cudaSuccess) return err;
  return reduce_partial(p.partials, 2, p.partial_elems, p.N, grid.x, p.C, nullptr, 1.0f, p.grad_res_shift, stream);
}

cudaError_t se_mlp_bwd(const SeMlpBwdParams& p, cudaStream_t stream) {
  if (p.N == 0 || p.C == 0) return cudaSuccess;
  if (p.scratch == nullptr) return cudaErrorInvalidValue;
  const size_t smem = sizeof(float) * (2 * static_cast<size_t>(p.C) + 2 * static_cast<size_t>(p.Hid));
  if (smem > 48 * 1024) return cudaErrorInvalidValue;
  se_mlp_bwd_kernel<<<p.N, mlp_threads(p.C), smem, stream>>>(p);
  cudaError_t err = last_error();
  if (err != cudaSuccess) return err;
  const int64_t total = 2 * static_cast<int64_t>(p.C) * p.Hid + p.C + p.Hid;
  const unsigned blocks = static_cast<unsigned>((total + 255) / 256 < 4096 ? (total + 255) / 256 : 4096);
  se_mlp_wgrad_kernel<<<blocks, 256, 0, stream>>>(p);
  return last_error();
}

cudaError_t se_bwd_apply(const SeBwdApplyParams& p_in, cudaStream_t stream) {
  SeBwdApplyParams p = p_in;
  dim3 grid;
  if (!pw_prepare(&p, &grid)) return cudaSuccess;
  const bool red_a = p.grad_scale_a != nullptr, red_b = p.grad_scale_b != nullptr;
  if ((red_a || red_b) && p.partials == nullptr) return cudaErrorInvalidValue;
  const bool vec = pw_vector_ok({strides_of(p.grad_out), strides_of(p.f.fa), strides_of(p.f.fb),
                                 strides_of(p.grad_fa), strides_of(p.grad_fb)},
                                16 / elem_bytes(p.dtype), p.C, p.H, p.W);
  MSFF_PW_LAUNCH(p.dtype, vec, se_bwd_apply_kernel, grid, stream, p);
  cudaError_t err = last_error();
  double* outs[4] = {p.grad_scale_a, p.grad_shift_a, p.grad_scale_b, p.grad_shift_b};
  for (int s = 0; s < 4 && err == cudaSuccess; ++s)
    if (outs[s] != nullptr)
      err = reduce_partial(p.partials, s, p.partial_elems, p.N, grid.x, p.C, nullptr, 1.0f, outs[s], stream);
  return err;
}

}  // namespace msff

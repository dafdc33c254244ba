// Tensor-core line convolutions for bf16/fp16 channels_last (the forward and the input gradient
// of lk_conv; csrc/cuda/line_conv.cu keeps the generic kernel for every other case).
//
// Design (one kernel body, two tensor-core back ends):
// * Persistent CTAs of 8 warps. A CTA owns BN output channels (blockIdx.y) and walks pixel tiles
//   tile = blockIdx.x, + gridDim.x, ...; a tile is BM = 128 consecutive pixels of one image line
//   along the convolution axis.
// * The weights of the CTA's BN channels, all K taps and all Cin, are staged ONCE per CTA into
//   shared memory (cp.async, 16-byte LDGSTS) in the canonical "core matrix" layout of wgmma's
//   K-major B operand (8 rows x 16 bytes per 128-byte core matrix). The host picks the largest
//   BN in {64, 32, 16} whose footprint fits the device's opt-in shared memory
//   (C=64, k=15: 123 KB of bf16 weights at BN=64).
// * The halo tile of a pixel tile (BM + K - 1 rows x Cin channels) is staged by cp.async into one
//   of two buffers while the other tile computes (zero-fill of the "same" padding by a 0-byte
//   source); the prologue (pending BN + ReLU) is applied in place once per staged element; the K
//   taps read it as shifted views (row offset t), never from global memory again.
// * kSm80: mma.sync.m16n8k16 with A and B fragments from ldmatrix; warp tile 32 x BN/2.
//   kSm90a: wgmma.m64nBNk16 with A from registers (ldmatrix of the shifted halo rows; a shared
//   memory descriptor cannot express an arbitrary row shift) and B from the weight descriptor;
//   two warpgroups of 64 pixels, one wgmma group in flight while the next A fragment loads.
// * Epilogue from the accumulator registers: bias, ReLU, residual add (kConv) or the
//   prologue's backward gate (kGate), paired 4-byte stores; BN statistics as per-CTA fp64
//   partials (fp32 per tile, fixed-order reductions) summed in CTA order by a second kernel,
//   so the statistics are deterministic.
#include <cuda.h>  // CUtensorMap (types only: the encoder is reached through cudaGetDriverEntryPoint*)
#include <cudaTypedefs.h>

#include "common.cuh"
#include "line_conv_plan.h"

namespace msff {
namespace {

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr));
}

template <typename T>
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, const uint32_t* b);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float* c, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float* c, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// ---- Hopper: wgmma with A in registers, B from a shared-memory descriptor --------------------
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MSFF_SM90A_DEVICE 1
#endif

#ifdef MSFF_SM90A_DEVICE
// Matrix descriptor, no swizzle: start address, leading (K direction) and stride (N direction)
// byte offsets between core matrices.
__device__ __forceinline__ uint64_t wgmma_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  uint64_t d = 0;
  d |= static_cast<uint64_t>((addr & 0x3FFFF) >> 4);
  d |= static_cast<uint64_t>((lbo & 0x3FFFF) >> 4) << 16;
  d |= static_cast<uint64_t>((sbo & 0x3FFFF) >> 4) << 32;
  return d;  // base offset 0, layout type 0 (no swizzle)
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// d (64 x N per warpgroup, fp32) += a (64 x 16, registers) * B (16 x N, descriptor). wgmma_rs:
// B K-major (imm-trans-b = 0); wgmma_rs_nmajor: B N-major (imm-trans-b = 1, B's N index is the
// contiguous one). One macro per N writes the asm of every (N, dtype, B-major) specialisation.
template <int N, typename T>
__device__ __forceinline__ void wgmma_rs(float* d, const uint32_t* a, uint64_t desc);
template <int N, typename T>
__device__ __forceinline__ void wgmma_rs_nmajor(float* d, const uint32_t* a, uint64_t desc);

#define MSFF_D8(d) "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
#define MSFF_D16(d) MSFF_D8(d), MSFF_D8((d + 8))
#define MSFF_D32(d) MSFF_D16(d), MSFF_D16((d + 16))
#define MSFF_WGMMA_A_IN "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1)
#define MSFF_WGMMA_FN(FN, N, T, PTX, TB, DREGS, AREGS, PRED, DOUT)                                   \
  template <>                                                                                        \
  __device__ __forceinline__ void FN<N, T>(float* d, const uint32_t* a, uint64_t desc) {             \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " PRED ", 0;\nwgmma.mma_async.sync.aligned.m64n" #N \
                 "k16.f32." PTX "." PTX " " DREGS ", " AREGS ", p, 1, 1, " #TB ";\n}\n"                \
                 : DOUT(d)                                                                           \
                 : MSFF_WGMMA_A_IN                                                                   \
                 : "memory");                                                                        \
  }
#define MSFF_WGMMA_N16(FN, T, PTX, TB) \
  MSFF_WGMMA_FN(FN, 16, T, PTX, TB, "{%0,%1,%2,%3,%4,%5,%6,%7}", "{%8,%9,%10,%11}, %12", "%13", MSFF_D8)
#define MSFF_WGMMA_N32(FN, T, PTX, TB)                                                                 \
  MSFF_WGMMA_FN(FN, 32, T, PTX, TB, "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}", \
                "{%16,%17,%18,%19}, %20", "%21", MSFF_D16)
#define MSFF_WGMMA_N64(FN, T, PTX, TB)                                                                 \
  MSFF_WGMMA_FN(FN, 64, T, PTX, TB,                                                                    \
                "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23," \
                "%24,%25,%26,%27,%28,%29,%30,%31}",                                                    \
                "{%32,%33,%34,%35}, %36", "%37", MSFF_D32)

MSFF_WGMMA_N16(wgmma_rs, __nv_bfloat16, "bf16", 0)
MSFF_WGMMA_N32(wgmma_rs, __nv_bfloat16, "bf16", 0)
MSFF_WGMMA_N64(wgmma_rs, __nv_bfloat16, "bf16", 0)
MSFF_WGMMA_N16(wgmma_rs, __half, "f16", 0)
MSFF_WGMMA_N32(wgmma_rs, __half, "f16", 0)
MSFF_WGMMA_N64(wgmma_rs, __half, "f16", 0)
MSFF_WGMMA_N64(wgmma_rs_nmajor, __nv_bfloat16, "bf16", 1)
MSFF_WGMMA_N64(wgmma_rs_nmajor, __half, "f16", 1)
#endif  // MSFF_SM90A_DEVICE

template <typename T>
struct Pair;
template <>
struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static __device__ __forceinline__ float2 to_float2(type v) { return __bfloat1622float2(v); }
  static __device__ __forceinline__ type from_float2(float a, float b) { return __floats2bfloat162_rn(a, b); }
};
template <>
struct Pair<__half> {
  using type = __half2;
  static __device__ __forceinline__ float2 to_float2(type v) { return __half22float2(v); }
  static __device__ __forceinline__ type from_float2(float a, float b) { return __floats2half2_rn(a, b); }
};

// Channel pairs (c, c+1) of a view as one 4-byte access: line_conv_choose only picks these
// kernels when every epilogue view has contiguous channels and 4-byte aligned pairs (pair_ok).
template <typename V>
__host__ __device__ inline bool pair_ok(const V& v) {
  return v.ptr == nullptr || (v.sc == 1 && ((v.sn | v.sh | v.sw) & 1) == 0 &&
                              (reinterpret_cast<uintptr_t>(v.ptr) & 3) == 0);
}
template <typename T>
__device__ __forceinline__ float2 load_pair(const View4& v, int n, int c, int h, int w) {
  const T* base = static_cast<const T*>(v.ptr);
  return Pair<T>::to_float2(*reinterpret_cast<const typename Pair<T>::type*>(base + offset4(v, n, c, h, w)));
}
template <typename T>
__device__ __forceinline__ void store_pair(const MutView4& v, int n, int c, int h, int w, float a, float b) {
  T* base = static_cast<T*>(v.ptr);
  *reinterpret_cast<typename Pair<T>::type*>(base + offset4(v, n, c, h, w)) = Pair<T>::from_float2(a, b);
}

// Per-launch facts the epilogue needs, fixed for the whole CTA.
struct EpiCtx {
  int n, line, pos0, L;
  bool gate;
};

// Epilogue of two neighbouring output channels (co, co + 1; Cout is a multiple of 8) of pixel
// pos0 + m, from their accumulators c[0], c[1]. kConv: writes the fp32 epilogue values (what the
// statistics sum) to out[0], out[1] for tile_stats (a separate array: writing them over the
// accumulators makes ptxas serialise the wgmma pipeline, C7514); kGate: adds its two statistics
// to s0/s1 (fp32, per channel of the pair).
template <typename T>
__device__ __forceinline__ void epi_pair(const LineConvParams& p, const EpiCtx& e, int m, int co, const float* c,
                                         float* out, float* s0, float* s1) {
  const int pos = e.pos0 + m;
  if (pos >= e.L || co >= p.Cout) return;
  float v0 = c[0], v1 = c[1];
  const int h = p.axis == 1 ? e.line : pos;
  const int w = p.axis == 1 ? pos : e.line;
  float a0 = 0.0f, a1 = 0.0f, b0 = 0.0f, b1 = 0.0f;
  if (!e.gate) {
    if (p.bias != nullptr) {
      v0 += p.bias[co];
      v1 += p.bias[co + 1];
    }
    if (p.relu) {
      v0 = fmaxf(v0, 0.0f);
      v1 = fmaxf(v1, 0.0f);
    }
    if (p.add.ptr != nullptr) {
      const float2 r = load_pair<T>(p.add, e.n, co, h, w);
      v0 += r.x;
      v1 += r.y;
    }
    out[0] = v0;
    out[1] = v1;
  } else {
    const float2 xg = load_pair<T>(p.gate_x, e.n, co, h, w);
    const float sc0 = p.gate_scale[co], sc1 = p.gate_scale[co + 1];
    const float g0 = xg.x * sc0 + p.gate_shift[co] > 0.0f ? v0 : 0.0f;
    const float g1 = xg.y * sc1 + p.gate_shift[co + 1] > 0.0f ? v1 : 0.0f;
    a0 = g0 * xg.x;
    a1 = g1 * xg.y;
    b0 = g0;
    b1 = g1;
    v0 = g0 * sc0;
    v1 = g1 * sc1;
  }
  if (p.y.ptr != nullptr) store_pair<T>(p.y, e.n, co, h, w, v0, v1);
  if (e.gate) {
    s0[0] += a0;
    s0[1] += a1;
    s1[0] += b0;
    s1[1] += b1;
  }
}

template <typename T, int BN, int ARCH, int BM = TC_BM>
struct TcTraits {
  // kSm80: WM x WN warps of 32 pixels x BN/WN channels (BM = 128: 4 x 2; BM = 64: 2 x 4);
  // kSm90a (BM = 128): 8 warps of 16 pixels x BN.
  static constexpr int WM = ARCH == 90 ? 8 : BM / 32;        // warps along the pixels (row groups)
  static constexpr int WN = 8 / WM;                           // warps along the channels
  static constexpr int ROW_GROUPS = WM;
  static constexpr int ROWS = BM / WM;                        // pixels per row group
  static constexpr int NJ = BN / (8 * WN);                    // n8 blocks per thread
  static constexpr int MI = ARCH == 90 ? 1 : 2;               // m16 blocks per thread
  static constexpr int ACC = MI * NJ * 4;
  static_assert(ARCH != 90 || BM == 128, "the wgmma kernels tile 128 pixels (two warpgroups of 64)");
  static_assert(NJ >= 1 && ROWS == 16 * MI, "warp tile");
};

// The tile of index `tile` (tiles of bm pixels): image n, line, first pixel pos0 along the axis.
__device__ __forceinline__ void tile_coords(int64_t tile, int segs, int lines, int bm, int* n, int* line,
                                            int* pos0) {
  *pos0 = static_cast<int>(tile % segs) * bm;
  *line = static_cast<int>((tile / segs) % lines);
  *n = static_cast<int>(tile / (static_cast<int64_t>(segs) * lines));
}

// Stages the weights of output channels co0 .. co0 + BN - 1, every tap, with 16-byte cp.async
// (zero-fill past Cout / Cin) into the canonical core-matrix layout of the K-major B operand:
// (t, co_l, ci) -> tap t, core matrix (co_l / 8, ci / 8). The caller commits and waits.
template <typename T, int BN>
__device__ __forceinline__ void stage_weights(const LineConvParams& p, const TcGeo& g, uint32_t wbase, int co0,
                                              int tid, int nthreads) {
  const int c8n = g.cin_pad / 8;
  const T* wnk = static_cast<const T*>(p.w_nk);
  for (int idx = tid; idx < p.K * BN * c8n; idx += nthreads) {
    const int c8 = idx % c8n;
    const int co_l = (idx / c8n) % BN;
    const int t = idx / (c8n * BN);
    const int co = co0 + co_l;
    const bool ok = co < p.Cout && c8 * 8 < p.Cin;
    const T* src = ok ? wnk + (static_cast<int64_t>(t) * p.Cout + co) * p.Cin + c8 * 8 : wnk;
    cp_async16(wbase + t * g.tap_bytes + (co_l >> 3) * g.sbo + c8 * 128 + (co_l & 7) * 16, src, ok);
  }
}

// The prologue's scale / shift into shared memory: prm = [scale (cin_pad) | shift (cin_pad)], zero
// past Cin. The caller's barrier makes them visible before the first prologue_unit.
__device__ __forceinline__ void stage_prologue_params(const LineConvParams& p, const TcGeo& g, float* prm, int tid,
                                                      int nthreads) {
  for (int i = tid; i < g.cin_pad; i += nthreads) {
    prm[i] = i < p.Cin ? p.in_scale[i] : 0.0f;
    prm[g.cin_pad + i] = i < p.Cin ? p.in_shift[i] : 0.0f;
  }
}

// The pending BN + ReLU of the producer, relu(x * scale + shift), applied in place to one staged
// 16-byte unit (channels 8 c8 .. 8 c8 + 7); prm = [scale (cin_pad) | shift (cin_pad)].
template <typename T>
__device__ __forceinline__ void prologue_unit(void* unit, int c8, const float* prm, int cin_pad) {
  uint4* q = reinterpret_cast<uint4*>(unit);
  uint4 v = *q;
  typename Pair<T>::type* h2 = reinterpret_cast<typename Pair<T>::type*>(&v);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int ci = c8 * 8 + 2 * j;
    const float2 f = Pair<T>::to_float2(h2[j]);
    h2[j] = Pair<T>::from_float2(fmaxf(f.x * prm[ci] + prm[cin_pad + ci], 0.0f),
                                 fmaxf(f.y * prm[ci + 1] + prm[cin_pad + ci + 1], 0.0f));
  }
  *q = v;
}

// BN statistics of one tile, added to the CTA's fp64 sums (thread tid < BN owns channel
// co0 + tid): deterministic (fixed shuffles, row groups summed in order).
// kConv: the epilogue left every element's fp32 value in acc (element (i, j, hh, q) is tile row
// row_base + 16 i + 8 hh, channel col_base + 8 j + q). Each row group sums d = v - c and d^2
// with c = the value of the group's first row (lane t4 holds it: a shuffle), so the fp32 rounding
// is relative to the spread of the values, not to their mean (BN's E[y^2] - E[y]^2 loses every
// digit when |mean| >> std); the owner turns each group's (rows n, c, S1 = sum d, S2 = sum d^2)
// into sum v = S1 + n c and sum v^2 = S2 + c (2 S1 + n c) in fp64, and the host forms
// M2 = sum v^2 - (sum v)^2 / count in fp64. kGate: s0 / s1 already hold the two plain sums (c = 0).
// Rows at or past valid_rows (past the end of the line) are excluded. scratch: [3][GROUPS][BN]
// floats; sync(): the barrier of the threads that run the epilogue.
template <int MI, int NJ, int GROUPS, int ROWS, int BN, typename Sync>
__device__ __forceinline__ void tile_stats(const float* acc, float (*s0)[2], float (*s1)[2], bool gate, int group,
                                           int row_base, int col_base, int valid_rows, int lane, int tid,
                                           float* scratch, double* cta_s0, double* cta_s1, Sync sync) {
  const int g8 = lane >> 2, t4 = lane & 3;
  float cs[NJ][2];
#pragma unroll
  for (int j = 0; j < NJ; ++j)
#pragma unroll
    for (int q = 0; q < 2; ++q) cs[j][q] = gate ? 0.0f : __shfl_sync(0xffffffffu, acc[j * 4 + q], t4);
  if (!gate) {
#pragma unroll
    for (int j = 0; j < NJ; ++j) s0[j][0] = s0[j][1] = s1[j][0] = s1[j][1] = 0.0f;
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        if (row_base + 16 * i + 8 * hh >= valid_rows) continue;
#pragma unroll
        for (int j = 0; j < NJ; ++j)
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            const float d = acc[(i * NJ + j) * 4 + 2 * hh + q] - cs[j][q];
            s0[j][q] += d;
            s1[j][q] = fmaf(d, d, s1[j][q]);
          }
      }
  }
#pragma unroll
  for (int j = 0; j < NJ; ++j)
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      float a = s0[j][q], b = s1[j][q];
#pragma unroll
      for (int off = 4; off < 32; off <<= 1) {
        a += __shfl_xor_sync(0xffffffffu, a, off);
        b += __shfl_xor_sync(0xffffffffu, b, off);
      }
      if (g8 == 0) {
        const int col = col_base + 8 * j + q;
        scratch[group * BN + col] = a;
        scratch[(GROUPS + group) * BN + col] = b;
        scratch[(2 * GROUPS + group) * BN + col] = cs[j][q];
      }
    }
  sync();
  if (tid < BN) {
#pragma unroll
    for (int r = 0; r < GROUPS; ++r) {
      const int rows = valid_rows - r * ROWS;
      const double n = rows <= 0 ? 0.0 : (rows >= ROWS ? ROWS : rows);
      if (n == 0.0) continue;
      const double a = scratch[r * BN + tid], b = scratch[(GROUPS + r) * BN + tid];
      const double c = scratch[(2 * GROUPS + r) * BN + tid];
      *cta_s0 += a + n * c;
      *cta_s1 += b + c * (2.0 * a + n * c);
    }
  }
  sync();
}

// The epilogue of one tile from the accumulators (element (i, j, hh, q) of acc: tile row
// row_base + 16 i + 8 hh, channel co0 + col_base + 8 j + q): epi_pair for every channel pair, then
// pre() (a barrier the caller needs before its scratch is reused) and, with stats, tile_stats.
template <typename T, int MI, int NJ, int GROUPS, int ROWS, int BN, typename Pre, typename Sync>
__device__ __forceinline__ void tile_epilogue(const LineConvParams& p, const EpiCtx& e, const float* acc, int co0,
                                              int row_base, int col_base, int group, int lane, int tid, bool stats,
                                              float* scratch, double* cta_s0, double* cta_s1, Pre pre, Sync sync) {
  float s0[NJ][2], s1[NJ][2];
  float val[MI * NJ * 4];  // kConv: the epilogue values (rows past the line: 0, never summed)
#pragma unroll
  for (int i = 0; i < MI * NJ * 4; ++i) val[i] = 0.0f;
#pragma unroll
  for (int j = 0; j < NJ; ++j) s0[j][0] = s0[j][1] = s1[j][0] = s1[j][1] = 0.0f;
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NJ; ++j)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh)
        epi_pair<T>(p, e, row_base + 16 * i + 8 * hh, co0 + col_base + 8 * j, &acc[(i * NJ + j) * 4 + 2 * hh],
                    &val[(i * NJ + j) * 4 + 2 * hh], s0[j], s1[j]);
  pre();
  if (stats)
    tile_stats<MI, NJ, GROUPS, ROWS, BN>(val, s0, s1, e.gate, group, row_base, col_base, e.L - e.pos0, lane, tid,
                                         scratch, cta_s0, cta_s1, sync);
}

// The CTA's fp64 statistics partials (2, gridDim.x, Cout), summed by reduce_partials_kernel.
template <int BN>
__device__ __forceinline__ void write_cta_stats(const LineConvParams& p, int co0, int tid, bool stats, double s0,
                                                double s1) {
  if (!stats || tid >= BN || co0 + tid >= p.Cout) return;
  const int64_t P = gridDim.x;
  p.partials[blockIdx.x * static_cast<int64_t>(p.Cout) + co0 + tid] = s0;
  p.partials[(P + blockIdx.x) * static_cast<int64_t>(p.Cout) + co0 + tid] = s1;
}

template <typename T, int BN, int ARCH, int BM>
__device__ __forceinline__ void line_conv_tc_body(const LineConvParams& p, unsigned char* smem) {
  using Tr = TcTraits<T, BN, ARCH, BM>;
  constexpr int NJ = Tr::NJ, MI = Tr::MI;
  const TcGeo g = tc_geometry(p.Cin, p.K, BN, BM);
  T* wsm = reinterpret_cast<T*>(smem);
  T* stage0 = reinterpret_cast<T*>(smem + g.w_bytes);
  T* stage1 = reinterpret_cast<T*>(smem + g.w_bytes + g.stage_bytes);
  float* prm = reinterpret_cast<float*>(smem + g.w_bytes + 2 * g.stage_bytes);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int L = p.axis == 1 ? p.W : p.H;
  const int lines = p.axis == 1 ? p.H : p.W;
  const int segs = (L + BM - 1) / BM;
  const int64_t tiles = static_cast<int64_t>(p.N) * lines * segs;
  const int co0 = blockIdx.y * BN;
  const int pad = p.K / 2;
  const int c8n = g.cin_pad / 8;
  const int ksteps = g.cin_pad / 16;
  const T* x = static_cast<const T*>(p.x.ptr);
  const int64_t x_step = p.axis == 1 ? p.x.sw : p.x.sh;
  const bool prologue = p.in_scale != nullptr;

  if (prologue) stage_prologue_params(p, g, prm, tid, TC_THREADS);
  stage_weights<T, BN>(p, g, smem_u32(wsm), co0, tid, TC_THREADS);
  cp_async_commit();

  auto load_halo = [&](int64_t tile, T* buf) {
    int n, line, pos0;
    tile_coords(tile, segs, lines, BM, &n, &line, &pos0);
    const int64_t x_line = p.axis == 1 ? n * p.x.sn + line * p.x.sh : n * p.x.sn + line * p.x.sw;
    const uint32_t base = smem_u32(buf);
    for (int idx = tid; idx < g.rows * c8n; idx += TC_THREADS) {
      const int r = idx / c8n, c8 = idx % c8n;
      const int pos = pos0 - pad + r;
      const bool ok = pos >= 0 && pos < L && c8 * 8 < p.Cin;
      const T* src = ok ? x + x_line + pos * x_step + c8 * 8 : x;
      cp_async16(base + (r * g.lda + c8 * 8) * 2, src, ok);
    }
  };

  EpiCtx e;
  e.L = L;
  e.gate = p.epilogue == Epilogue::kGate;
  const bool stats = p.stat0 != nullptr;
  double cta_s0 = 0.0, cta_s1 = 0.0;  // this CTA's statistics of channel co0 + tid (tid < BN)

  const int g8 = lane >> 2, t4 = lane & 3;
  int64_t tile = blockIdx.x;
  if (tile < tiles) load_halo(tile, stage0);
  cp_async_commit();
  for (int it = 0; tile < tiles; ++it, tile += gridDim.x) {
    T* cur = (it & 1) ? stage1 : stage0;
    if (tile + gridDim.x < tiles) load_halo(tile + gridDim.x, (it & 1) ? stage0 : stage1);
    cp_async_commit();
    cp_async_wait<1>();  // the weights and this tile's halo have landed (this thread's copies)
#ifdef MSFF_SM90A_DEVICE
    if constexpr (ARCH == 90) fence_proxy_async();  // make them visible to wgmma's async proxy
#endif
    __syncthreads();
    tile_coords(tile, segs, lines, BM, &e.n, &e.line, &e.pos0);
    if (prologue) {
      // relu(x * scale + shift), once per staged element; padding rows stay zero.
      for (int idx = tid; idx < g.rows * c8n; idx += TC_THREADS) {
        const int r = idx / c8n, c8 = idx % c8n;
        const int pos = e.pos0 - pad + r;
        if (pos < 0 || pos >= L || c8 * 8 >= p.Cin) continue;
        prologue_unit<T>(cur + r * g.lda + c8 * 8, c8, prm, g.cin_pad);
      }
      __syncthreads();
    }

    float acc[Tr::ACC];
#pragma unroll
    for (int i = 0; i < Tr::ACC; ++i) acc[i] = 0.0f;
    int row_base, col_base;  // this thread's first accumulator row (pixel) and column (channel)
    if constexpr (ARCH == 90) {
#ifdef MSFF_SM90A_DEVICE
      const uint32_t a_base = smem_u32(cur) + ((warp * 16 + (lane & 15)) * g.lda + (lane >> 4) * 8) * 2;
      const uint32_t w_base = smem_u32(wsm);
      const int steps = p.K * ksteps;
      uint32_t a0[4], a1[4];
      auto step = [&](int s, uint32_t* a) {
        const int t = s / ksteps, ks = s - t * ksteps;
        ldmatrix_x4(a, a_base + (t * g.lda + ks * 16) * 2);
        wgmma_fence();
        wgmma_rs<BN, T>(acc, a, wgmma_desc(w_base + t * g.tap_bytes + ks * 256, 128, g.sbo));
        wgmma_commit();
        wgmma_wait<1>();  // the previous step's wgmma is done: its A registers may be reloaded
      };
      for (int s = 0; s < steps; s += 2) {
        step(s, a0);
        if (s + 1 < steps) step(s + 1, a1);
      }
      wgmma_wait<0>();
#endif
      row_base = warp * 16 + g8;
      col_base = 2 * t4;
    } else {
      const int warp_m = warp % Tr::WM, warp_n = warp / Tr::WM;
      const uint32_t a_base =
          smem_u32(cur) + ((warp_m * 32 + (lane & 15)) * g.lda + (lane >> 4) * 8) * 2;
      const uint32_t b_base =
          smem_u32(wsm) + (warp_n * NJ) * g.sbo + ((lane >> 3) & 1) * 128 + (lane & 7) * 16;
      for (int t = 0; t < p.K; ++t) {
        for (int ks = 0; ks < ksteps; ++ks) {
          uint32_t a[MI][4];
#pragma unroll
          for (int i = 0; i < MI; ++i) ldmatrix_x4(a[i], a_base + ((i * 16 + t) * g.lda + ks * 16) * 2);
#pragma unroll
          for (int j = 0; j < NJ; ++j) {
            uint32_t b[2];
            ldmatrix_x2(b, b_base + t * g.tap_bytes + j * g.sbo + ks * 256);
#pragma unroll
            for (int i = 0; i < MI; ++i) mma16816<T>(&acc[(i * NJ + j) * 4], a[i], b);
          }
        }
      }
      row_base = warp_m * 32 + g8;
      col_base = warp_n * (BN / Tr::WN) + 2 * t4;
    }

    // Epilogue straight from the accumulators: acc[(i * NJ + j) * 4 + q] is pixel
    // row_base + 16 i + 8 (q >> 1), channel col_base + 8 j + (q & 1).
    // [3][ROW_GROUPS][BN] floats: <= 6 KB, and a halo stage is >= BM rows x 24 elements x 2 B
    static_assert(3 * Tr::ROW_GROUPS * BN * 4 <= BM * 24 * 2, "statistics scratch exceeds a halo stage");
    // the barrier before the statistics: every warp is done reading `cur`, which becomes their
    // scratch; tile_stats' last barrier frees it for the next prefetch
    tile_epilogue<T, MI, NJ, Tr::ROW_GROUPS, Tr::ROWS, BN>(
        p, e, acc, co0, row_base, col_base, ARCH == 90 ? warp : warp % Tr::WM, lane, tid, stats,
        reinterpret_cast<float*>(cur), &cta_s0, &cta_s1, [] { __syncthreads(); }, [] { __syncthreads(); });
  }
  cp_async_wait<0>();
  write_cta_stats<BN>(p, co0, tid, stats, cta_s0, cta_s1);
}

// ---- sm_90a: TMA-fed, warp-specialised forward / input gradient (line_conv_tma_kernel) ---------
// Warps 0-7 (two warpgroups) consume, warp 8 produces. The producer's elected lane walks the
// CTA's tiles ahead of the consumers: it waits until a stage is free (empty[s] mbarrier), arms
// full[s] with the byte count of the halo boxes (mbarrier.arrive.expect_tx) and issues one
// cp.async.bulk.tensor.4d per 64-channel box from the host-encoded tensor map (out-of-bounds
// rows and channels arrive as zeros: the "same" padding). The consumers wait on full[s], apply
// the pending BN + ReLU in place once per staged element (padding stays zero), run the same
// wgmma main loop as line_conv_sm90a_kernel on the swizzled stage, release the stage (one arrive
// per consumer warp on empty[s]) and run the epilogue while the producer refills it. Stages:
// tma_geometry() (up to 4). Weights: resident, staged once by the consumers with cp.async.
#ifdef MSFF_SM90A_DEVICE
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred P1;\nLAB_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
      "@P1 bra DONE;\nbra LAB_WAIT;\nDONE:\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const void* tmap, uint32_t bar, int c0, int c1, int c2,
                                            int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], "
      "[%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tmap)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}
// Named barrier of the 256 consumer threads (barrier 0 is __syncthreads, which the producer
// never reaches after the role split).
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;\n" ::"n"(TMA_CONSUMERS) : "memory"); }

// Byte address of 16-byte unit u (channels 8u .. 8u + 7, u < 8) of row r in a 128-byte-swizzled
// box that starts at a 1024-byte aligned address.
__device__ __forceinline__ uint32_t swz(uint32_t box, int r, int u) {
  return box + static_cast<uint32_t>(r) * 128u + ((static_cast<uint32_t>(u) ^ (r & 7)) << 4);
}
#endif

template <typename T, int BN>
__device__ __forceinline__ void line_conv_tma_body(const CUtensorMap* tmap, const LineConvParams& p,
                                                   unsigned char* smem_raw) {
#ifdef MSFF_SM90A_DEVICE
  using Tr = TcTraits<T, BN, 90>;
  constexpr int NJ = Tr::NJ, BM = TC_BM;
  const TcGeo g = tc_geometry(p.Cin, p.K, BN);
  // 1024-byte aligned base (the swizzle pattern is a function of address bits 7-9)
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (base - raw);
  // the same plan as the host's (same budget): stages and offsets
  const TmaGeo tg = tma_geometry(p.Cin, p.K, BN, p.smem_optin);
  const int S = tg.stages;
  const int chunks = (p.Cin + TMA_BC - 1) / TMA_BC;
  const uint32_t chunk_bytes = static_cast<uint32_t>(tg.stage_bytes / chunks);
  T* wsm = reinterpret_cast<T*>(smem);
  const uint32_t stages = base + tg.stages_off;
  float* prm = reinterpret_cast<float*>(smem + tg.prm_off);
  float* scratch = reinterpret_cast<float*>(smem + tg.scratch_off);  // [3][8][BN]: tile_stats
  const uint32_t full = base + tg.bar_off, empty = full + 8 * S;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int L = p.axis == 1 ? p.W : p.H;
  const int lines = p.axis == 1 ? p.H : p.W;
  const int segs = (L + BM - 1) / BM;
  const int64_t tiles = static_cast<int64_t>(p.N) * lines * segs;
  const int co0 = blockIdx.y * BN;
  const int pad = p.K / 2;
  const int ksteps = g.cin_pad / 16;
  const bool prologue = p.in_scale != nullptr;
  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(full + 8 * s, 1);                        // the producer's arrive.expect_tx
      mbar_init(empty + 8 * s, TMA_CONSUMERS / 32);      // one arrive per consumer warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();  // the last CTA-wide barrier: roles split below

  if (warp == TMA_CONSUMERS / 32) {
    // ---- producer warp: one elected lane issues every TMA load ----
    if (lane == 0) {
      int it = 0;
      for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x, ++it) {
        const int s = it % S;
        if (it >= S) mbar_wait(empty + 8 * s, ((it / S) & 1) ^ 1);  // the consumers freed stage s
        int n, line, pos0;
        tile_coords(tile, segs, lines, BM, &n, &line, &pos0);
        mbar_arrive_expect_tx(full + 8 * s, static_cast<uint32_t>(chunks * TMA_BC * g.rows * 2));
        for (int kc = 0; kc < chunks; ++kc)
          tma_load_4d(stages + s * tg.stage_bytes + kc * chunk_bytes, tmap, full + 8 * s, kc * TMA_BC,
                      pos0 - pad, line, n);
      }
    }
    return;
  }

  // ---- consumers ----
  if (prologue) stage_prologue_params(p, g, prm, tid, TMA_CONSUMERS);
  {
    stage_weights<T, BN>(p, g, smem_u32(wsm), co0, tid, TMA_CONSUMERS);
    cp_async_commit();
    cp_async_wait<0>();
    fence_proxy_async();  // the weights are read by wgmma (async proxy)
    consumers_sync();
  }

  EpiCtx e;
  e.L = L;
  e.gate = p.epilogue == Epilogue::kGate;
  const bool stats = p.stat0 != nullptr;
  double cta_s0 = 0.0, cta_s1 = 0.0;
  const int g8 = lane >> 2, t4 = lane & 3;
  const int a_row = warp * 16 + (lane & 15), a_unit = lane >> 4;
  const uint32_t w_base = smem_u32(wsm);
  const int steps = p.K * ksteps;
  int it = 0;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x, ++it) {
    const int s = it % S;
    const uint32_t cur = stages + s * tg.stage_bytes;
    mbar_wait(full + 8 * s, (it / S) & 1);  // the TMA bytes of this tile have landed
    tile_coords(tile, segs, lines, BM, &e.n, &e.line, &e.pos0);
    if (prologue) {
      // relu(x * scale + shift), once per staged element; padding rows and channels stay zero.
      const int units = chunks * (TMA_BC / 8);
      unsigned char* cur_g = smem + tg.stages_off + s * tg.stage_bytes;
      for (int idx = tid; idx < g.rows * units; idx += TMA_CONSUMERS) {
        const int r = idx / units, u = idx % units;
        const int pos = e.pos0 - pad + r;
        const int c8 = u;  // channels 8u .. 8u + 7
        if (pos < 0 || pos >= L || c8 * 8 >= p.Cin) continue;
        prologue_unit<T>(cur_g + (u >> 3) * chunk_bytes + swz(0, r, u & 7), c8, prm, g.cin_pad);
      }
      consumers_sync();
    }

    float acc[Tr::ACC];
#pragma unroll
    for (int i = 0; i < Tr::ACC; ++i) acc[i] = 0.0f;
    uint32_t a0[4], a1[4];
    auto step = [&](int st, uint32_t* a) {
      const int t = st / ksteps, ks = st - t * ksteps;
      const int r = a_row + t;
      const int u = (ks & 3) * 2 + a_unit;  // 16-byte unit inside the 64-channel box
      ldmatrix_x4(a, swz(cur + (ks >> 2) * chunk_bytes, r, u));
      wgmma_fence();
      wgmma_rs<BN, T>(acc, a, wgmma_desc(w_base + t * g.tap_bytes + ks * 256, 128, g.sbo));
      wgmma_commit();
      wgmma_wait<1>();
    };
    for (int st = 0; st < steps; st += 2) {
      step(st, a0);
      if (st + 1 < steps) step(st + 1, a1);
    }
    wgmma_wait<0>();
    // this warp is done with stage s: the producer may refill it
    if (prologue) fence_proxy_async();  // generic-proxy writes before the next async-proxy write
    __syncwarp();
    if (lane == 0) mbar_arrive(empty + 8 * s);

    tile_epilogue<T, 1, NJ, 8, TC_BM / 8, BN>(p, e, acc, co0, warp * 16 + g8, 2 * t4, warp, lane, tid, stats,
                                             scratch, &cta_s0, &cta_s1, [] {}, [] { consumers_sync(); });
  }
  write_cta_stats<BN>(p, co0, tid, stats, cta_s0, cta_s1);
#endif
}

template <typename T, int BN>
__global__ void __launch_bounds__(TMA_THREADS, 1)
    line_conv_tma_kernel(const __grid_constant__ CUtensorMap tmap, const LineConvParams p) {
  extern __shared__ __align__(1024) unsigned char tma_smem[];
#if defined(MSFF_SM90A_DEVICE)
  line_conv_tma_body<T, BN>(&tmap, p, tma_smem);
#elif defined(__CUDA_ARCH__)
  __trap();  // compiled without sm_90a: the host only launches it from an sm_90a build on a 9.0 GPU
#endif
}

template <typename T, int BN, int BM>
__global__ void __launch_bounds__(TC_THREADS, 1) line_conv_sm80_kernel(LineConvParams p) {
  extern __shared__ __align__(128) unsigned char tc_smem[];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  line_conv_tc_body<T, BN, 80, BM>(p, tc_smem);
#elif defined(__CUDA_ARCH__)
  __trap();  // the host never launches it below sm_80
#endif
}

template <typename T, int BN>
__global__ void __launch_bounds__(TC_THREADS, 1) line_conv_sm90a_kernel(LineConvParams p) {
  extern __shared__ __align__(128) unsigned char tc_smem[];
#if defined(MSFF_SM90A_DEVICE)
  line_conv_tc_body<T, BN, 90, TC_BM>(p, tc_smem);
#elif defined(__CUDA_ARCH__)
  __trap();  // compiled without sm_90a: the host only launches it from an sm_90a build on a 9.0 GPU
#endif
}

// ---- weight gradient: GEMM of M = Cout, N = K * Cin, reduction over pixels ----------------------
// CTA (blockIdx.x: 64 output channels, blockIdx.y: 32 input channels, blockIdx.z: split) walks a
// contiguous range of 128-pixel segments. Per segment it stages g (128 pixels x 64 channels) and
// the halo of the recomputed activation (128 + K - 1 pixels x 32 channels, prologue applied once
// per element) with cp.async into one of two buffers while the other computes. Every tap is a
// shifted view of the same halo: A = g^T via ldmatrix.trans, B = halo rows p + t via
// ldmatrix.trans, mma.sync into per-tap accumulators (2 x 15 x 4 fp32 per thread). Warps: 2 (32
// output channels) x 4 (8 input channels). The CTA writes its fp32 tile to its own slice of the
// partials; reduce_wgrad_kernel sums the slices in split order.
// kSm90a variant: the roles swap so that the shift stays on the register operand. A warpgroup
// computes D[(t, ci)][co] = sum_p halo[p + t][ci] * g[p][co] with A = 64 (tap, channel) rows from
// registers (ldmatrix.trans of the shifted halo rows; each warp picks its own tap) and B = the g
// tile from a shared-memory descriptor (N-major core matrices, as cp.async stores 8 channels of
// one pixel); rows (t, ci) = 32 t + ci, 8 blocks of 64 rows (two taps each), 4 per warpgroup.
template <typename T, int ARCH>
__device__ __forceinline__ void line_conv_wgrad_body(const LineConvWgradParams& p, unsigned char* smem) {
  const TcWgradGeo geo = tc_wgrad_geometry(p.K);
  float* prm = reinterpret_cast<float*>(smem + 2 * geo.stage_bytes);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g8 = lane >> 2, t4 = lane & 3;
  const int co0 = blockIdx.x * WG_CO, ci0 = blockIdx.y * WG_CI;
  const int split = blockIdx.z, splits = gridDim.z;
  const int L = p.axis == 1 ? p.W : p.H;
  const int lines = p.axis == 1 ? p.H : p.W;
  const int segs = (L + WG_S - 1) / WG_S;
  const int64_t total = static_cast<int64_t>(p.N) * lines * segs;
  const int64_t s_begin = total * split / splits, s_end = total * (split + 1) / splits;
  const int pad = p.K / 2;
  const T* x = static_cast<const T*>(p.x.ptr);
  const T* gp = static_cast<const T*>(p.g.ptr);
  const int64_t x_step = p.axis == 1 ? p.x.sw : p.x.sh;
  const int64_t g_step = p.axis == 1 ? p.g.sw : p.g.sh;
  const bool prologue = p.in_scale != nullptr;
  if (prologue && tid < WG_CI) {
    const int ci = ci0 + tid;
    prm[tid] = ci < p.Cin ? p.in_scale[ci] : 0.0f;
    prm[WG_CI + tid] = ci < p.Cin ? p.in_shift[ci] : 0.0f;
  }

  auto g_buf = [&](int b) { return reinterpret_cast<T*>(smem + b * geo.stage_bytes); };
  auto a_buf = [&](int b) { return reinterpret_cast<T*>(smem + b * geo.stage_bytes + geo.g_bytes); };
  auto decode = [&](int64_t s, int& n, int& line, int& pos0) {
    pos0 = static_cast<int>(s % segs) * WG_S;
    line = static_cast<int>((s / segs) % lines);
    n = static_cast<int>(s / (static_cast<int64_t>(segs) * lines));
  };
  auto load_stage = [&](int64_t s, int b) {
    int n, line, pos0;
    decode(s, n, line, pos0);
    const int64_t x_line = p.axis == 1 ? n * p.x.sn + line * p.x.sh : n * p.x.sn + line * p.x.sw;
    const int64_t g_line = p.axis == 1 ? n * p.g.sn + line * p.g.sh : n * p.g.sn + line * p.g.sw;
    const uint32_t gb = smem_u32(g_buf(b)), ab = smem_u32(a_buf(b));
    for (int idx = tid; idx < WG_S * (WG_CO / 8); idx += WG_THREADS) {
      const int m = idx / (WG_CO / 8), c8 = idx % (WG_CO / 8);
      const int pos = pos0 + m, co = co0 + c8 * 8;
      const bool ok = pos < L && co < p.Cout;
      // kSm80: row-major rows of WG_CO + 8; kSm90a: core matrices (8 pixels x 8 channels)
      const uint32_t off = ARCH == 90 ? (m >> 3) * (WG_CO / 8) * 128 + c8 * 128 + (m & 7) * 16
                                      : (m * geo.ldg + c8 * 8) * 2;
      cp_async16(gb + off, ok ? gp + g_line + pos * g_step + co : gp, ok);
    }
    for (int idx = tid; idx < geo.rows * (WG_CI / 8); idx += WG_THREADS) {
      const int r = idx / (WG_CI / 8), c8 = idx % (WG_CI / 8);
      const int pos = pos0 - pad + r, ci = ci0 + c8 * 8;
      const bool ok = pos >= 0 && pos < L && ci < p.Cin;
      cp_async16(ab + (r * geo.lda + c8 * 8) * 2, ok ? x + x_line + pos * x_step + ci : x, ok);
    }
  };

  // kSm80: acc[i][t][q] (2 m16 blocks x WG_KMAX taps); kSm90a: acc[j][32] (4 m64 blocks x 64 co)
  constexpr int ACC_A = ARCH == 90 ? 4 : 2;
  constexpr int ACC_B = ARCH == 90 ? 32 : WG_KMAX * 4;
  float acc[ACC_A][ACC_B];
#pragma unroll
  for (int i = 0; i < ACC_A; ++i)
#pragma unroll
    for (int q = 0; q < ACC_B; ++q) acc[i][q] = 0.0f;

  if (s_begin < s_end) load_stage(s_begin, 0);
  cp_async_commit();
  int it = 0;
  for (int64_t s = s_begin; s < s_end; ++s, ++it) {
    const int b = it & 1;
    if (s + 1 < s_end) load_stage(s + 1, b ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
#ifdef MSFF_SM90A_DEVICE
    if constexpr (ARCH == 90) fence_proxy_async();  // the g tile is read by wgmma's async proxy
#endif
    __syncthreads();
    T* ab = a_buf(b);
    if (prologue) {
      int n, line, pos0;
      decode(s, n, line, pos0);
      for (int idx = tid; idx < geo.rows * (WG_CI / 8); idx += WG_THREADS) {
        const int r = idx / (WG_CI / 8), c8 = idx % (WG_CI / 8);
        const int pos = pos0 - pad + r;
        if (pos < 0 || pos >= L || ci0 + c8 * 8 >= p.Cin) continue;
        uint4* q = reinterpret_cast<uint4*>(ab + r * geo.lda + c8 * 8);
        uint4 v = *q;
        typename Pair<T>::type* h2 = reinterpret_cast<typename Pair<T>::type*>(&v);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int c = c8 * 8 + 2 * j;
          const float2 f = Pair<T>::to_float2(h2[j]);
          h2[j] = Pair<T>::from_float2(fmaxf(f.x * prm[c] + prm[WG_CI + c], 0.0f),
                                       fmaxf(f.y * prm[c + 1] + prm[WG_CI + c + 1], 0.0f));
        }
        *q = v;
      }
      __syncthreads();
    }
    if constexpr (ARCH == 90) {
#ifdef MSFF_SM90A_DEVICE
      const int wg = warp >> 2, wq = warp & 3;
      // lane address inside a 16 (pixel) x 16 (channel) A block read transposed, shifted t rows
      const uint32_t a_lane = smem_u32(ab) + (((lane & 7) + ((lane >> 4) & 1) * 8) * geo.lda + (wq & 1) * 16 +
                                              ((lane >> 3) & 1) * 8) * 2;
      const uint32_t g_base = smem_u32(g_buf(b));
      // Every block issues its wgmma unconditionally (a wgmma under a branch makes ptxas
      // serialise the pipeline); rows of taps >= K reuse tap K - 1 and are never stored.
      int tap[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int t = (wg * 4 + j) * 2 + (wq >> 1);
        tap[j] = t < p.K ? t : p.K - 1;
      }
      uint32_t a0[4][4], a1[4][4];
      auto step = [&](int kk, uint32_t (*a)[4]) {
#pragma unroll
        for (int j = 0; j < 4; ++j) ldmatrix_x4_trans(a[j], a_lane + (kk + tap[j]) * geo.lda * 2);
        wgmma_fence();
        const uint64_t desc = wgmma_desc(g_base + (kk >> 3) * (WG_CO / 8) * 128, (WG_CO / 8) * 128, 128);
#pragma unroll
        for (int j = 0; j < 4; ++j) wgmma_rs_nmajor<WG_CO, T>(acc[j], a[j], desc);
        wgmma_commit();
        wgmma_wait<1>();
      };
#pragma unroll 1
      for (int kk = 0; kk < WG_S; kk += 32) {
        step(kk, a0);
        step(kk + 16, a1);
      }
      wgmma_wait<0>();
#endif
    } else {
      const int warp_m = warp & 1, warp_n = warp >> 1;
      const uint32_t g_base = smem_u32(g_buf(b)) + (((lane & 7) + ((lane >> 4) & 1) * 8) * geo.ldg + warp_m * 32 +
                                                    ((lane >> 3) & 1) * 8) * 2;
      const uint32_t a_base = smem_u32(ab) + (((lane & 7) + ((lane >> 3) & 1) * 8) * geo.lda + warp_n * 8) * 2;
#pragma unroll 1
      for (int kk = 0; kk < WG_S; kk += 16) {
        uint32_t a[2][4];
#pragma unroll
        for (int i = 0; i < 2; ++i) ldmatrix_x4_trans(a[i], g_base + (kk * geo.ldg + i * 16) * 2);
#pragma unroll
        for (int t = 0; t < WG_KMAX; ++t) {
          if (t < p.K) {
            uint32_t bf[2];
            ldmatrix_x2_trans(bf, a_base + (kk + t) * geo.lda * 2);
            mma16816<T>(&acc[0][t * 4], a[0], bf);
            mma16816<T>(&acc[1][t * 4], a[1], bf);
          }
        }
      }
    }
    __syncthreads();  // buffer b is free for the prefetch of segment s + 2
  }
  cp_async_wait<0>();
  float* part = p.partials + static_cast<int64_t>(split) * p.Cout * p.Cin * p.K;
  if constexpr (ARCH == 90) {
    // acc[j][4 jn + q]: row (t, ci) = 64 (4 wg + j) + 16 wq + g8 + 8 (q >> 1), co = 8 jn + 2 t4 + (q & 1)
    const int wg = warp >> 2, wq = warp & 3;
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int q = 0; q < 32; ++q) {
        const int row = (wg * 4 + j) * 64 + wq * 16 + g8 + 8 * ((q & 3) >> 1);
        const int t = row / WG_CI, ci = ci0 + row % WG_CI;
        const int co = co0 + 8 * (q >> 2) + 2 * t4 + (q & 1);
        if (t < p.K && co < p.Cout && ci < p.Cin)
          part[(static_cast<int64_t>(co) * p.Cin + ci) * p.K + t] = acc[j][q];
      }
  } else {
    const int warp_m = warp & 1, warp_n = warp >> 1;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int t = 0; t < WG_KMAX; ++t)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int co = co0 + warp_m * 32 + i * 16 + g8 + 8 * (q >> 1);
          const int ci = ci0 + warp_n * 8 + 2 * t4 + (q & 1);
          if (t < p.K && co < p.Cout && ci < p.Cin)
            part[(static_cast<int64_t>(co) * p.Cin + ci) * p.K + t] = acc[i][t * 4 + q];
        }
  }
}

template <typename T>
__global__ void __launch_bounds__(WG_THREADS, 1) line_conv_wgrad_tc_kernel(LineConvWgradParams p) {
  extern __shared__ __align__(128) unsigned char tc_smem[];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  line_conv_wgrad_body<T, 80>(p, tc_smem);
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

template <typename T>
__global__ void __launch_bounds__(WG_THREADS, 1) line_conv_wgrad_sm90a_kernel(LineConvWgradParams p) {
  extern __shared__ __align__(128) unsigned char tc_smem[];
#if defined(MSFF_SM90A_DEVICE)
  line_conv_wgrad_body<T, 90>(p, tc_smem);
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

// dw[e] = sum over splits (in split order) of the partial tiles: deterministic.
__global__ void reduce_wgrad_kernel(const float* partials, int splits, int64_t elems, float* dw) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= elems) return;
  float acc = 0.0f;
  for (int s = 0; s < splits; ++s) acc += partials[s * elems + e];
  dw[e] = acc;
}

// stat[c] = sum over CTAs (in CTA order) of the fp64 partials: deterministic.
__global__ void reduce_partials_kernel(const double* partials, int ctas, int C, double* stat0, double* stat1) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double a = 0.0, b = 0.0;
  for (int i = 0; i < ctas; ++i) {
    a += partials[static_cast<int64_t>(i) * C + c];
    b += partials[static_cast<int64_t>(ctas + i) * C + c];
  }
  stat0[c] = a;
  stat1[c] = b;
}

// ---- host side -------------------------------------------------------------------------------
struct DeviceFacts {
  int cc = 0, smem_optin = 0, sms = 0;
};

DeviceFacts device_facts() {
  DeviceFacts f;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return f;
  }
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&f.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&f.sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return DeviceFacts{};
  }
  f.cc = 10 * major + minor;
  return f;
}

// cuTensorMapEncodeTiled from the driver the runtime already loaded (no -lcuda at link time).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
#if CUDART_VERSION >= 12050
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q);
#else
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f, cudaEnableDefault, &q);
#endif
    if (err != cudaSuccess || q != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      f = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

TmaHaloDesc halo_desc_of(const LineConvParams& p) {
  return tma_halo_desc(p.N, p.Cin, p.H, p.W, p.x.sn, p.x.sc, p.x.sh, p.x.sw, p.K, p.axis, 2,
                       reinterpret_cast<uintptr_t>(p.x.ptr));
}

// The 4-D halo tensor map of p.x (tma_halo_desc), 128-byte swizzle, zero fill out of bounds.
bool encode_halo_map(const LineConvParams& p, CUtensorMap* map) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  const TmaHaloDesc d = halo_desc_of(p);
  if (encode == nullptr || !d.ok) return false;
  const cuuint64_t dims[4] = {d.dims[0], d.dims[1], d.dims[2], d.dims[3]};
  const cuuint64_t strides[3] = {d.strides[0], d.strides[1], d.strides[2]};
  const cuuint32_t box[4] = {d.box[0], d.box[1], d.box[2], d.box[3]};
  const cuuint32_t estr[4] = {1, 1, 1, 1};
  const CUresult r = encode(map, p.dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                            4, const_cast<void*>(p.x.ptr), dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);  // NONE = zeros (NAN_REQUEST_ZERO_FMA: NaN)
  return r == CUDA_SUCCESS;
}

template <typename T, int BN, int BM>
cudaError_t launch_tc_bn(const LineConvParams& p_in, cudaStream_t stream) {
  LineConvParams p = p_in;
  TcFwdPlan pl{};
  tc_fwd_grid(p.N, p.Cout, p.H, p.W, p.axis, BN, p.num_sms, &pl, BM);
  if (pl.tiles == 0) return cudaSuccess;  // empty batch or image: nothing to do, statistics stay 0
  const TcGeo g = tc_geometry(p.Cin, p.K, BN, BM);
  const int64_t ctas = pl.grid_x;
  const dim3 grid(static_cast<unsigned>(pl.grid_x), pl.grid_y);
  cudaError_t err;
  if constexpr (BM != TC_BM) {  // the 64-pixel tile: mma.sync kernel only
    if (p.kernel != ConvKernel::kSm80) return cudaErrorInvalidValue;
    err = cudaFuncSetAttribute(line_conv_sm80_kernel<T, BN, BM>, cudaFuncAttributeMaxDynamicSharedMemorySize, g.total);
    if (err != cudaSuccess) return err;
    line_conv_sm80_kernel<T, BN, BM><<<grid, TC_THREADS, g.total, stream>>>(p);
  } else if (p.kernel == ConvKernel::kSm90aTma) {
    CUtensorMap map;
    if (!encode_halo_map(p, &map)) return cudaErrorInvalidValue;
    const TmaGeo tg = tma_geometry(p.Cin, p.K, BN, p.smem_optin);
    if (tg.stages < 2) return cudaErrorInvalidValue;
    err = cudaFuncSetAttribute(line_conv_tma_kernel<T, BN>, cudaFuncAttributeMaxDynamicSharedMemorySize, tg.total);
    if (err != cudaSuccess) return err;
    line_conv_tma_kernel<T, BN><<<grid, TMA_THREADS, tg.total, stream>>>(map, p);
  } else if (p.kernel == ConvKernel::kSm90a) {
    err = cudaFuncSetAttribute(line_conv_sm90a_kernel<T, BN>, cudaFuncAttributeMaxDynamicSharedMemorySize, g.total);
    if (err != cudaSuccess) return err;
    line_conv_sm90a_kernel<T, BN><<<grid, TC_THREADS, g.total, stream>>>(p);
  } else {
    err = cudaFuncSetAttribute(line_conv_sm80_kernel<T, BN, BM>, cudaFuncAttributeMaxDynamicSharedMemorySize, g.total);
    if (err != cudaSuccess) return err;
    line_conv_sm80_kernel<T, BN, BM><<<grid, TC_THREADS, g.total, stream>>>(p);
  }
  err = last_error();
  if (err != cudaSuccess || p.stat0 == nullptr) return err;
  reduce_partials_kernel<<<(p.Cout + 127) / 128, 128, 0, stream>>>(p.partials, static_cast<int>(ctas), p.Cout,
                                                                   p.stat0, p.stat1);
  return last_error();
}

template <typename T>
cudaError_t launch_tc(const LineConvParams& p_in, cudaStream_t stream) {
  const DeviceFacts f = device_facts();
  LineConvParams p = p_in;
  p.smem_optin = f.smem_optin;
  // the same tile line_conv_choose planned with (the 64-pixel tile: mma.sync kernel only)
  const TcTile t = tc_pick_tile(p.Cin, p.Cout, p.K, f.smem_optin, p.kernel == ConvKernel::kSm80);
  if (t.bm == TC_BM_SMALL) {
    if (t.bn == 64) return launch_tc_bn<T, 64, TC_BM_SMALL>(p, stream);
    if (t.bn == 32) return launch_tc_bn<T, 32, TC_BM_SMALL>(p, stream);
    return cudaErrorInvalidValue;
  }
  switch (t.bn) {
    case 64:
      return launch_tc_bn<T, 64, TC_BM>(p, stream);
    case 32:
      return launch_tc_bn<T, 32, TC_BM>(p, stream);
    case 16:
      return launch_tc_bn<T, 16, TC_BM>(p, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t launch_wgrad_tc(const LineConvWgradParams& p, cudaStream_t stream) {
  const TcWgradPlan pl = tc_wgrad_plan(p.N, p.Cin, p.Cout, p.H, p.W, p.K, p.axis, p.num_sms);
  if (pl.segments == 0) return cudaMemsetAsync(p.dw, 0, sizeof(float) * p.Cout * p.Cin * p.K, stream);
  auto kernel = p.kernel == ConvKernel::kSm90a ? line_conv_wgrad_sm90a_kernel<T> : line_conv_wgrad_tc_kernel<T>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, pl.smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(pl.co_tiles, pl.ci_tiles, pl.splits);
  kernel<<<grid, WG_THREADS, pl.smem, stream>>>(p);
  err = last_error();
  if (err != cudaSuccess) return err;
  const int64_t elems = static_cast<int64_t>(p.Cout) * p.Cin * p.K;
  return reduce_wgrad_slices(p.partials, pl.splits, elems, p.dw, stream);
}

// 16-byte cp.async of 8 channels of one pixel: channels contiguous, pixels 16-byte aligned.
template <typename V>
bool cp_async_ok(const V& v) {
  return v.sc == 1 && (v.sn | v.sh | v.sw) % 8 == 0 && reinterpret_cast<uintptr_t>(v.ptr) % 16 == 0;
}

}  // namespace

ConvKernel line_conv_wgrad_choose(const LineConvWgradParams& p, ConvRequest request) {
  if (request == ConvRequest::kGeneric) return ConvKernel::kGeneric;
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) return ConvKernel::kGeneric;
  if (p.Cin <= 0 || p.Cout <= 0 || p.Cin % 8 != 0 || p.Cout % 8 != 0) return ConvKernel::kGeneric;
  if (p.K < 1 || p.K % 2 == 0 || p.K > WG_KMAX) return ConvKernel::kGeneric;
  if (!cp_async_ok(p.x) || !cp_async_ok(p.g)) return ConvKernel::kGeneric;
  const DeviceFacts f = device_facts();
  if (f.cc < 80 || tc_wgrad_geometry(p.K).total > f.smem_optin) return ConvKernel::kGeneric;
#ifdef MSFF_HAVE_SM90A
  // the wgmma weight gradient stages with cp.async under both Hopper requests
  if ((request == ConvRequest::kBest || request == ConvRequest::kCpAsync) && f.cc == 90) return ConvKernel::kSm90a;
#endif
  return ConvKernel::kSm80;
}

cudaError_t reduce_wgrad_slices(const float* partials, int slices, int64_t elems, float* dw, cudaStream_t stream) {
  if (elems == 0) return cudaSuccess;
  reduce_wgrad_kernel<<<static_cast<unsigned>((elems + 255) / 256), 256, 0, stream>>>(partials, slices, elems, dw);
  return last_error();
}

cudaError_t line_conv_wgrad_tc(const LineConvWgradParams& p, cudaStream_t stream) {
  if (p.partials == nullptr) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat16:
      return launch_wgrad_tc<__half>(p, stream);
    case DType::kBFloat16:
      return launch_wgrad_tc<__nv_bfloat16>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

ConvKernel line_conv_choose(const LineConvParams& p, ConvRequest request) {
  if (request == ConvRequest::kGeneric) return ConvKernel::kGeneric;
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) return ConvKernel::kGeneric;
  if (p.Cin <= 0 || p.Cout <= 0 || p.Cin % 8 != 0 || p.Cout % 8 != 0) return ConvKernel::kGeneric;
  if (p.K < 1 || p.K % 2 == 0 || p.K > 31) return ConvKernel::kGeneric;
  if (!cp_async_ok(p.x)) return ConvKernel::kGeneric;
  if (!pair_ok(p.y) || !pair_ok(p.add) || !pair_ok(p.gate_x)) return ConvKernel::kGeneric;
  const DeviceFacts f = device_facts();
  const int bn = tc_pick_bn(p.Cin, p.Cout, p.K, f.smem_optin);  // the wgmma kernels' (128-pixel) tile
  // the mma.sync kernel may also take the 64-pixel tile
  if (f.cc < 80 || tc_pick_tile(p.Cin, p.Cout, p.K, f.smem_optin, true).bn == 0) return ConvKernel::kGeneric;
#ifdef MSFF_HAVE_SM90A
  if (f.cc == 90 && bn > 0 && request == ConvRequest::kCpAsync) return ConvKernel::kSm90a;
  if (f.cc == 90 && bn > 0 && request == ConvRequest::kBest) {
    // TMA where the tensor map can describe x and the stages fit; else the cp.async pipeline
    const bool tma = halo_desc_of(p).ok && tma_geometry(p.Cin, p.K, bn, f.smem_optin).stages >= 2 &&
                     tensor_map_encoder() != nullptr;
    return tma ? ConvKernel::kSm90aTma : ConvKernel::kSm90a;
  }
#endif
  return ConvKernel::kSm80;
}

cudaError_t line_conv_tc_forward(const LineConvParams& p, cudaStream_t stream) {
  if (p.w_nk == nullptr || (p.stat0 != nullptr && p.partials == nullptr)) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat16:
      return launch_tc<__half>(p, stream);
    case DType::kBFloat16:
      return launch_tc<__nv_bfloat16>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace msff

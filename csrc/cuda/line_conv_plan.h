// Launch plans of the tensor-core line-convolution kernels (csrc/cuda/line_conv_tc.cu): tile
// sizes, shared memory, grid. Plain C++ (host and device), so that the kernels, their launchers
// and the torch glue (which exposes the plan as msff::_lk_conv_cuda_plan for the kernel report)
// share one source of truth.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define MSFF_HD __host__ __device__
#else
#define MSFF_HD
#endif

namespace msff {

constexpr int TC_BM = 128;       // forward: pixels per tile (one image line segment)
constexpr int TC_BM_SMALL = 64;  // forward, mma.sync kernel only: the tile when 128 pixels do not fit
constexpr int TC_THREADS = 256;  // 8 warps (two warpgroups on sm_90a)
constexpr int WG_S = 128;        // weight gradient: pixels per staged segment (GEMM K step)
constexpr int WG_CO = 64;        // weight gradient: output channels per CTA (GEMM M)
constexpr int WG_CI = 32;        // weight gradient: input channels per CTA (GEMM N = K * WG_CI)
constexpr int WG_KMAX = 15;      // weight gradient: taps held in registers
constexpr int WG_THREADS = 256;

MSFF_HD inline int round_up(int v, int m) { return (v + m - 1) / m * m; }

// Shared-memory geometry of the forward kernel. Byte sizes are multiples of 128.
struct TcGeo {
  int cin_pad;    // Cin rounded up to 16 (one k16 step)
  int lda;        // halo row length in elements: cin_pad + 8 (16 bytes of skew against bank conflicts)
  int rows;       // BM + K - 1
  int sbo;        // bytes between consecutive 8-channel groups of one tap's weights
  int tap_bytes;  // one tap's weights
  int w_bytes, stage_bytes, prm_bytes, total;
};

MSFF_HD inline TcGeo tc_geometry(int Cin, int K, int bn, int bm = TC_BM) {
  TcGeo g;
  g.cin_pad = round_up(Cin, 16);
  g.lda = g.cin_pad + 8;
  g.rows = bm + K - 1;
  g.sbo = g.cin_pad * 16;
  g.tap_bytes = g.cin_pad * bn * 2;
  g.w_bytes = round_up(K * g.tap_bytes, 128);
  g.stage_bytes = round_up(g.rows * g.lda * 2, 128);
  g.prm_bytes = round_up(2 * g.cin_pad * 4, 128);
  g.total = g.w_bytes + 2 * g.stage_bytes + g.prm_bytes;
  return g;
}

// A forward tile: bm pixels x bn output channels (bn == 0: none fits).
struct TcTile {
  int bm, bn;
};

// The forward tile whose resident weights + two halo stages fit the opt-in shared memory of one
// block: the widest bn first (each n-tile stages the halo again), then 128 pixels before 64. The
// 64-pixel tile (bn >= 32; 2 x 4 warps) exists only in the mma.sync kernel (small_bm): on an A100
// (163 KB) E2's 128 channels get 64 x 32 (160 KB) instead of 128 x 16, half the halo re-staging.
// The wgmma kernels need 128 pixels (two warpgroups of 64 rows).
inline TcTile tc_pick_tile(int Cin, int Cout, int K, int smem_optin, bool small_bm) {
  const int first = Cout <= 16 ? 16 : (Cout <= 32 ? 32 : 64);
  for (int bn = first; bn >= 16; bn /= 2) {
    if (tc_geometry(Cin, K, bn, TC_BM).total <= smem_optin) return {TC_BM, bn};
    if (small_bm && bn >= 32 && tc_geometry(Cin, K, bn, TC_BM_SMALL).total <= smem_optin) return {TC_BM_SMALL, bn};
  }
  return {TC_BM, 0};
}
inline int tc_pick_bn(int Cin, int Cout, int K, int smem_optin) { return tc_pick_tile(Cin, Cout, K, smem_optin, false).bn; }

struct TcFwdPlan {
  int bm, bn, smem, grid_x, grid_y;
  int64_t tiles;
};

// Persistent grid: one CTA per SM in all (shared memory allows one), pixel tiles strided over them.
inline void tc_fwd_grid(int N, int Cout, int H, int W, int axis, int bn, int sms, TcFwdPlan* pl, int bm = TC_BM) {
  const int L = axis == 1 ? W : H, lines = axis == 1 ? H : W;
  pl->bm = bm;
  pl->bn = bn;
  pl->tiles = static_cast<int64_t>(N) * lines * ((L + bm - 1) / bm);
  pl->grid_y = (Cout + bn - 1) / bn;
  int64_t ctas = (sms > 0 ? sms : 1) / pl->grid_y;
  if (ctas < 1) ctas = 1;
  if (ctas > pl->tiles) ctas = pl->tiles;
  pl->grid_x = static_cast<int>(ctas);
}

// small_bm: the mma.sync kernel's plan (sm_80, and MSFF_CUDA_CONV=sm80 on Hopper); else the
// wgmma kernels' (tc / tc-cpasync on Hopper).
inline TcFwdPlan tc_fwd_plan(int N, int Cin, int Cout, int H, int W, int K, int axis, int smem_optin, int sms,
                             bool small_bm = false) {
  TcFwdPlan pl{};
  pl.bm = TC_BM;
  const TcTile t = tc_pick_tile(Cin, Cout, K, smem_optin, small_bm);
  if (t.bn == 0) return pl;
  tc_fwd_grid(N, Cout, H, W, axis, t.bn, sms, &pl, t.bm);
  pl.smem = tc_geometry(Cin, K, t.bn, t.bm).total;
  return pl;
}

// ---- sm_90a forward / input gradient with TMA (line_conv_tma_kernel) -------------------------
// The halo of a tile is loaded by the Tensor Memory Accelerator from a 4-D tensor map of the
// channels_last activation: dims (innermost first) {C, L, lines, N}, L = the convolution axis
// (W for axis 1, H for axis 0), lines = the other spatial axis. A box is TMA_BC channels x
// (TC_BM + K - 1) rows x 1 x 1 at coordinates {chunk * TMA_BC, pos0 - K/2, line, n}; everything
// outside the tensor (rows before 0 / past L, channels past C) is zero-filled by the hardware,
// which is exactly the "same" padding and the channel tail. 128-byte swizzle: a row is 128 bytes
// (64 bf16 channels), its 16-byte unit u lands at unit u ^ (row & 7), so ldmatrix of 8 rows is
// bank-conflict free.
constexpr int TMA_BC = 64;               // channels per box (128 bytes of bf16/fp16)
constexpr int TMA_SWIZZLE = 128;         // CU_TENSOR_MAP_SWIZZLE_128B
constexpr int TMA_MAX_STAGES = 4;
constexpr int TMA_CONSUMERS = 256;       // two consumer warpgroups (wgmma)
constexpr int TMA_THREADS = TMA_CONSUMERS + 32;  // + one producer warp

struct TmaHaloDesc {
  uint64_t dims[4];     // elements, innermost first: C, L, lines, N
  uint64_t strides[3];  // bytes of dims 1..3 (dim 0 is contiguous)
  uint32_t box[4];      // TMA_BC, rows, 1, 1
  int chunks;           // boxes per halo tile: ceil(C / TMA_BC)
  int box_bytes;        // bytes one box writes (zero-filled parts included): the expect-tx count
  int chunk_bytes;      // shared-memory footprint of one box, 1024-byte aligned (swizzle atom)
  bool ok;              // encodable: 16-byte strides and base, channels contiguous, rows <= 256
};

// Descriptor parameters of the halo tensor map for an activation (N, C, H, W) with element strides
// (sn, sc, sh, sw), base address `base`, elements of `elem_bytes` bytes.
inline TmaHaloDesc tma_halo_desc(int N, int C, int H, int W, int64_t sn, int64_t sc, int64_t sh, int64_t sw,
                                 int K, int axis, int elem_bytes, uint64_t base) {
  TmaHaloDesc d{};
  const int64_t s_l = axis == 1 ? sw : sh, s_line = axis == 1 ? sh : sw;
  d.dims[0] = static_cast<uint64_t>(C);
  d.dims[1] = static_cast<uint64_t>(axis == 1 ? W : H);
  d.dims[2] = static_cast<uint64_t>(axis == 1 ? H : W);
  d.dims[3] = static_cast<uint64_t>(N);
  d.strides[0] = static_cast<uint64_t>(s_l) * elem_bytes;
  d.strides[1] = static_cast<uint64_t>(s_line) * elem_bytes;
  d.strides[2] = static_cast<uint64_t>(sn) * elem_bytes;
  const int rows = TC_BM + K - 1;
  d.box[0] = TMA_BC;
  d.box[1] = static_cast<uint32_t>(rows);
  d.box[2] = 1;
  d.box[3] = 1;
  d.chunks = (C + TMA_BC - 1) / TMA_BC;
  d.box_bytes = TMA_BC * rows * elem_bytes;
  d.chunk_bytes = round_up(d.box_bytes, 1024);
  bool ok = sc == 1 && elem_bytes * TMA_BC == TMA_SWIZZLE && rows <= 256 && base % 16 == 0 && N > 0 && C > 0 &&
            H > 0 && W > 0;
  for (int i = 0; i < 3; ++i) {
    const int64_t s = i == 0 ? s_l : (i == 1 ? s_line : sn);
    ok = ok && s > 0 && d.strides[i] % 16 == 0 && d.strides[i] < (uint64_t(1) << 40);
  }
  d.ok = ok;
  return d;
}

// Shared memory of line_conv_tma_kernel: resident weights (as tc_geometry), then `stages` halo
// stages of `chunks` swizzled boxes, the prologue parameters, the statistics scratch and the
// 2 x stages mbarriers, plus 1 KB to align the stages to 1024 bytes.
struct TmaGeo {
  int stages, stage_bytes, stages_off, prm_off, scratch_off, bar_off, total;
};

MSFF_HD inline TmaGeo tma_geometry(int Cin, int K, int bn, int smem_optin) {
  const TcGeo g = tc_geometry(Cin, K, bn);
  TmaGeo t{};
  const int chunks = (Cin + TMA_BC - 1) / TMA_BC;
  t.stage_bytes = chunks * round_up(TMA_BC * (TC_BM + K - 1) * 2, 1024);
  for (int s = TMA_MAX_STAGES; s >= 2; --s) {
    const int stages_off = round_up(g.w_bytes, 1024);
    const int prm_off = stages_off + s * t.stage_bytes;
    const int scratch_off = prm_off + g.prm_bytes;
    const int bar_off = scratch_off + 3 * 8 * bn * 4;  // tile_stats: [3][8 warps][bn] floats
    const int total = bar_off + 2 * s * 8 + 1024;
    if (total <= smem_optin) {
      t.stages = s;
      t.stages_off = stages_off;
      t.prm_off = prm_off;
      t.scratch_off = scratch_off;
      t.bar_off = bar_off;
      t.total = total;
      return t;
    }
  }
  return t;  // stages == 0: does not fit, the cp.async kernel runs
}

// Weight gradient: CTA (co tile, ci tile, split) reduces the pixel segments of its split into a
// WG_CO x (K * WG_CI) fp32 tile written to its own slice of the partials buffer
// (splits, Cout, Cin, K); a second kernel sums the slices in split order (deterministic).
struct TcWgradGeo {
  int ldg;  // g tile row length (elements): WG_CO + 8
  int lda;  // halo row length (elements): WG_CI + 8
  int rows;  // WG_S + K - 1
  int g_bytes, a_bytes, stage_bytes, prm_bytes, total;
};

MSFF_HD inline TcWgradGeo tc_wgrad_geometry(int K) {
  TcWgradGeo g;
  g.ldg = WG_CO + 8;
  g.lda = WG_CI + 8;
  g.rows = WG_S + K - 1;
  g.g_bytes = round_up(WG_S * g.ldg * 2, 128);
  g.a_bytes = round_up(g.rows * g.lda * 2, 128);
  g.stage_bytes = g.g_bytes + g.a_bytes;
  g.prm_bytes = round_up(2 * WG_CI * 4, 128);
  g.total = 2 * g.stage_bytes + g.prm_bytes;
  return g;
}

struct TcWgradPlan {
  int smem, co_tiles, ci_tiles, splits;
  int64_t segments;
  int64_t partial_elems;  // splits * Cout * Cin * K fp32
};

inline TcWgradPlan tc_wgrad_plan(int N, int Cin, int Cout, int H, int W, int K, int axis, int sms) {
  TcWgradPlan pl{};
  pl.smem = tc_wgrad_geometry(K).total;
  const int L = axis == 1 ? W : H, lines = axis == 1 ? H : W;
  pl.segments = static_cast<int64_t>(N) * lines * ((L + WG_S - 1) / WG_S);
  pl.co_tiles = (Cout + WG_CO - 1) / WG_CO;
  pl.ci_tiles = (Cin + WG_CI - 1) / WG_CI;
  int64_t splits = (sms > 0 ? sms : 1) / (pl.co_tiles * pl.ci_tiles);
  if (splits < 1) splits = 1;
  if (splits > pl.segments) splits = pl.segments;
  if (splits > 65535) splits = 65535;
  pl.splits = static_cast<int>(splits);
  pl.partial_elems = static_cast<int64_t>(pl.splits) * Cout * Cin * K;
  return pl;
}

}  // namespace msff

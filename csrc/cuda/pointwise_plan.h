// Launch plan of the pointwise + channel-reduction kernels (csrc/cuda/pointwise.cu). Plain C++,
// shared by the kernels, the torch glue (which sizes the partials scratch with it) and the CPU op
// msff::_pointwise_cuda_plan (tests, kernel report), so all three agree by construction.
#pragma once

#include <stdint.h>

namespace msff {

constexpr int PW_TC = 64;        // channels per CTA tile
constexpr int PW_TP = 256;       // pixels per sub-tile (one pass of the CTA over PW_TC x PW_TP)
constexpr int PW_THREADS = 256;  // 8 warps
constexpr int PW_SLOTS = 8;      // reduction slots per channel inside a CTA (fixed order)
constexpr int PW_MIN_CTAS = 2048;  // spans shrink until the grid has at least this many CTAs

// Elements per 16-byte vector for an element size in bytes (bf16/fp16: 8, fp32: 4).
inline int pw_vec_width(int elem_bytes) { return 16 / elem_bytes; }

struct PwPlan {
  int ctiles;   // channel tiles of PW_TC (grid.y)
  int pblocks;  // pixel blocks per image (grid.x); each CTA walks `span` pixels
  int span;     // pixels per CTA, a multiple of PW_TP
  int64_t partial_elems;  // fp64 partials per reduced quantity: N * pblocks * C
};

// A CTA = PW_TC channels x `span` pixels of one image. The span depends only on the shape (never on
// the device), so the per-CTA partials, and the fixed-order sums over them, are reproducible.
inline PwPlan pw_plan(int N, int C, int H, int W) {
  PwPlan p{};
  const int64_t hw = static_cast<int64_t>(H) * W;
  if (N <= 0 || C <= 0 || hw <= 0) return p;
  p.ctiles = (C + PW_TC - 1) / PW_TC;
  const int64_t subtiles = (hw + PW_TP - 1) / PW_TP;
  const int64_t others = static_cast<int64_t>(N) * p.ctiles;
  int64_t want = (PW_MIN_CTAS + others - 1) / others;  // pixel blocks per image
  if (want > subtiles) want = subtiles;
  if (want < 1) want = 1;
  const int64_t per = (subtiles + want - 1) / want;  // sub-tiles per CTA
  p.span = static_cast<int>(per * PW_TP);
  p.pblocks = static_cast<int>((subtiles + per - 1) / per);
  p.partial_elems = static_cast<int64_t>(N) * p.pblocks * C;
  return p;
}

}  // namespace msff

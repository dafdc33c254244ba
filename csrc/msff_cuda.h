// Host-side interface of the bare CUDA kernels in csrc/cuda/*.cu.
//
// This header is included by both nvcc (the kernels) and the host C++ compiler (the torch glue in
// cuda_ops.cpp). It depends only on the CUDA runtime API, never on torch, so that each .cu file
// compiles in seconds. Tensors travel as raw pointers plus element strides in (N, C, H, W) order,
// which covers NCHW, channels_last and non-contiguous views alike.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace msff {

// Element type of activations and weights; accumulation is always fp32.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// How fp32 inputs use the tensor cores: kTF32 rounds operands to TF32 (what cuDNN does when
// torch.backends.cudnn.allow_tf32 is set); kExact splits each operand into two TF32 halves and
// sums three products ("3xTF32"), which keeps fp32 accuracy (~1e-6 relative) on tensor cores.
enum class Fp32Mode : int { kExact = 0, kTF32 = 1 };

// A 4-D view: base pointer and strides (in elements) for dims (N, C, H, W).
struct View4 {
  const void* ptr;
  int64_t sn, sc, sh, sw;
};

struct MutView4 {
  void* ptr;
  int64_t sn, sc, sh, sw;
};

// Line (1-D) convolution along H (axis = 0, a k×1 kernel) or W (axis = 1, a 1×k kernel) with
// "same" zero padding, stride 1, as an implicit GEMM on tensor cores (SPEC.md, op lk_conv):
//   a[n, ci, p]  = relu(x * in_scale[ci] + in_shift[ci])  if in_scale, else x   (cast to T)
//   acc[n,co,p]  = sum_{t, ci} a[n, ci, p + t - K/2] * w[t, ci, co]   (a = 0 outside the image)
// Epilogue kEpiConv:
//   v = relu?(acc + bias[co]) + add[n, co, p];   y = v (cast to T)
//   stat0[co] += sum_{n,p} v,  stat1[co] += sum_{n,p} v^2    (fp32 v, before the cast; optional)
// Epilogue kEpiGate (the prologue's backward, used by the input-gradient convolution):
//   m = (gate_x * gate_scale[co] + gate_shift[co] > 0);  y = acc * m * gate_scale[co]
//   stat0[co] += sum acc * m * gate_x,  stat1[co] += sum acc * m
// w is packed (K, Cin, Cout) contiguous in T. stat0/stat1 are fp64 (Cout,), zeroed by the caller.
enum class Epilogue : int { kConv = 0, kGate = 1 };

// Which forward/input-gradient kernel runs (csrc/cuda/line_conv.cu is kGeneric, every layout and
// dtype; csrc/cuda/line_conv_tc.cu holds the tensor-core pipelines for bf16/fp16 channels_last
// with Cin, Cout multiples of 8): kSm80 = mma.sync fed by ldmatrix from cp.async (sm_80 and up),
// kSm90a = wgmma with the halo staged by cp.async (sm_90a builds on a compute-capability 9.0 GPU),
// kSm90aTma = wgmma with the halo staged by TMA in an mbarrier pipeline fed by a producer warp.
enum class ConvKernel : int { kGeneric = 0, kSm80 = 1, kSm90a = 2, kSm90aTma = 3 };

// What the caller asks for (the MSFF_CUDA_CONV environment variable, else the process default of
// csrc/conv_request.h, read by the torch glue at every call):
// kGeneric (the default until a GPU validation record says otherwise), kBest (the fastest
// tensor-core kernel of this GPU where the shape allows it, else generic: on Hopper the TMA
// pipeline), kSm80 (the mma.sync kernel even on Hopper, for parity checks), kCpAsync (on Hopper
// the wgmma kernel with cp.async staging instead of TMA: the fallback, and a parity check).
enum class ConvRequest : int { kGeneric = 0, kBest = 1, kSm80 = 2, kCpAsync = 3 };

struct LineConvParams {
  View4 x;
  const void* w;
  MutView4 y;  // ptr may be null with kEpiGate when only the statistics are wanted
  const float* in_scale;  // nullptr: no prologue
  const float* in_shift;
  const float* bias;  // nullptr: none
  int relu;
  View4 add;  // ptr nullptr: none
  Epilogue epilogue;
  View4 gate_x;
  const float* gate_scale;
  const float* gate_shift;
  double* stat0;  // nullptr: no statistics
  double* stat1;
  int N, Cin, Cout, H, W, K, axis;
  DType dtype;
  Fp32Mode fp32_mode;
  // Tensor-core kernels only (kernel != kGeneric):
  ConvKernel kernel;     // from line_conv_choose()
  const void* w_nk;      // the weight packed (K, Cout, Cin) contiguous, 16-byte aligned
  double* partials;      // (2, num_sms, Cout) fp64 scratch of the deterministic statistics
  int num_sms;
  int smem_optin;        // filled by the launcher: the budget the TMA kernel's stages were planned in
};

// The kernel that line_conv_forward would run for p (reads p's shapes, strides, dtype and the
// device's compute capability), given the caller's request.
ConvKernel line_conv_choose(const LineConvParams& p, ConvRequest request);

// Weight gradient of the line convolution above (prologue recomputed from x, never stored):
//   dw[co, ci, t] = sum_{n, p} g[n, co, p] * a[n, ci, p + t - K/2]
// dw is fp32 (Cout, Cin, K) contiguous, overwritten from per-split fp32 partials summed in a fixed
// order (deterministic, every kernel); nothing is written when there are no pixels or channels,
// so the caller zeroes it for such shapes. g has Cout channels.
struct LineConvWgradParams {
  View4 x;
  View4 g;
  float* dw;
  const float* in_scale;  // nullptr: no prologue (else relu(x * in_scale + in_shift))
  const float* in_shift;
  int N, Cin, Cout, H, W, K, axis;
  DType dtype;
  Fp32Mode fp32_mode;
  int num_sms;  // sizes the split over pixels
  ConvKernel kernel;  // from line_conv_wgrad_choose()
  // fp32 partials scratch: tc_wgrad_plan(...).partial_elems elements (csrc/cuda/line_conv_plan.h)
  // for the tensor-core kernels, line_conv_wgrad_generic_partial_elems(p) for kGeneric (may be
  // 0 and then nullptr: one split writes dw directly).
  float* partials;
};

// Size (fp32 elements) of the generic weight gradient's partials scratch for p.
int64_t line_conv_wgrad_generic_partial_elems(const LineConvWgradParams& p);

// dw[e] = sum over the `slices` fp32 slices of `elems` partials, in slice order (deterministic):
// the last step of both weight gradients (reduce_wgrad_kernel, csrc/cuda/line_conv_tc.cu).
cudaError_t reduce_wgrad_slices(const float* partials, int slices, int64_t elems, float* dw, cudaStream_t stream);

// The weight-gradient kernel line_conv_wgrad would run for p, given the caller's request
// (kSm80 = mma.sync, split-K over pixels, deterministic; it is also what kBest runs on Hopper).
ConvKernel line_conv_wgrad_choose(const LineConvWgradParams& p, ConvRequest request);

// ---- pointwise + channel-reduction kernels (csrc/cuda/pointwise.cu) -------------------------
// All walk a (N, C, H, W) domain in CTA tiles of 64 channels x `span` pixels of one image
// (csrc/cuda/pointwise_plan.h), with 16-byte vectors along the first tensor's contiguous axis
// where the layouts allow. Per-channel sums are fp64 (C,), per-(n, c) sums fp32 (N, C); both are
// WRITTEN (not accumulated) from per-CTA fp64 partials summed in a fixed order: deterministic,
// no atomics. `partials` is caller-provided scratch of (number of reductions) x
// pw_plan(N, C, H, W).partial_elems doubles; `span` and `partial_elems` are filled by the
// launcher (callers leave them 0).

// Backward prologue of lk_conv's epilogue (SPEC.md, _lk_conv_backward):
//   g = grad_y + grad_sum[c] + 2 * y * grad_sumsq[c];  grad_add = g
//   g_r = relu ? g * (y - add > 0) : g;                 grad_bias[c] = sum g_r
struct LkConvBwdPrepParams {
  View4 grad_y;
  const float* grad_sum;  // nullptr: absent
  const float* grad_sumsq;
  View4 y;
  View4 add;  // ptr nullptr: none
  int relu;
  MutView4 g_r;       // ptr nullptr: not written
  MutView4 grad_add;  // ptr nullptr: not written
  double* grad_bias;  // nullptr: not reduced
  int N, C, H, W;
  DType dtype;
  double* partials;      // scratch (see above); nullptr only when nothing is reduced
  int span;              // filled by the launcher
  int64_t partial_elems; // filled by the launcher
};

// Branch pair of lkam_se: F = act(fa, scale_a, shift_a) + act(fb, scale_b, shift_b), with
// act(t, s, h) = relu(t * s[c] + h[c]) when s is given, else t; fb may be absent.
struct BranchPair {
  View4 fa;
  View4 fb;  // ptr nullptr: absent
  const float* scale_a;
  const float* shift_a;
  const float* scale_b;
  const float* shift_b;
};

// pooled[n, c] = sum_{h,w} F / (H * W)
struct SePoolParams {
  BranchPair f;
  float* pooled;
  int N, C, H, W;
  DType dtype;
  double* partials;      // scratch (see above); nullptr only when nothing is reduced
  int span;              // filled by the launcher
  int64_t partial_elems; // filled by the launcher
};

// z[n, c] = sigmoid(relu(pooled @ w1.T + b1) @ w2.T + b2); w1 (Hid, C), w2 (C, Hid) fp32.
struct SeExciteParams {
  const float* pooled;
  const float* w1;
  const float* b1;
  const float* w2;
  const float* b2;
  float* z;
  int N, C, Hid;
};

// out = R + F * z[n, c], R = residual * res_scale[c] + res_shift[c] (if res_scale) else residual.
struct SeApplyParams {
  BranchPair f;
  const float* z;
  View4 residual;
  const float* res_scale;
  const float* res_shift;
  MutView4 out;
  int N, C, H, W;
  DType dtype;
  int span;              // filled by the launcher
  int64_t partial_elems; // filled by the launcher
};

// First backward pass of lkam_se:
//   gz[n, c] = sum_{h,w} grad_out * F;  grad_residual = grad_out * res_scale[c] (or grad_out)
//   grad_res_scale[c] = sum grad_out * residual;  grad_res_shift[c] = sum grad_out
struct SeBwdReduceParams {
  View4 grad_out;
  BranchPair f;
  View4 residual;
  const float* res_scale;
  MutView4 grad_residual;  // ptr nullptr: not written
  float* gz;
  double* grad_res_scale;  // nullptr: not reduced
  double* grad_res_shift;
  int N, C, H, W;
  DType dtype;
  double* partials;      // scratch (see above); nullptr only when nothing is reduced
  int span;              // filled by the launcher
  int64_t partial_elems; // filled by the launcher
};

// The SE MLP backward, one block per image (SPEC.md, _lkam_se_backward):
//   gq = gz * z * (1 - z); gu = (gq @ w2) * (u > 0); gp = gu @ w1 + grad_pooled
//   grad_b2 = sum_n gq; grad_w2 = gq^T v; grad_b1 = sum_n gu; grad_w1 = gu^T pooled (written, summed
//   over images in image order by a second kernel: deterministic, no atomics)
struct SeMlpBwdParams {
  const float* pooled;
  const float* gz;
  const float* grad_pooled;  // nullptr: absent
  const float* w1;
  const float* b1;
  const float* w2;
  const float* b2;
  float* gp;
  float* grad_w1;
  float* grad_b1;
  float* grad_w2;
  float* grad_b2;
  int N, C, Hid;
  float* scratch;  // N * (C + 2 * Hid) fp32: per-image gq, relu(u), gu rows
};

// Second backward pass of lkam_se: gF = grad_out * z[n, c] + gp[n, c] / (H * W); per branch
// with a scale: m = (t * s + h > 0), grad_t = gF * m * s, grad_s[c] = sum gF * m * t,
// grad_h[c] = sum gF * m; without: grad_t = gF.
struct SeBwdApplyParams {
  View4 grad_out;
  BranchPair f;
  const float* z;
  const float* gp;
  MutView4 grad_fa;
  MutView4 grad_fb;  // ptr nullptr: not written
  double* grad_scale_a;  // nullptr: not reduced
  double* grad_shift_a;
  double* grad_scale_b;
  double* grad_shift_b;
  int N, C, H, W;
  DType dtype;
  double* partials;      // scratch (see above); nullptr only when nothing is reduced
  int span;              // filled by the launcher
  int64_t partial_elems; // filled by the launcher
};

cudaError_t lk_conv_bwd_prep(const LkConvBwdPrepParams& p, cudaStream_t stream);
cudaError_t se_pool(const SePoolParams& p, cudaStream_t stream);
cudaError_t se_excite(const SeExciteParams& p, cudaStream_t stream);
cudaError_t se_apply(const SeApplyParams& p, cudaStream_t stream);
cudaError_t se_bwd_reduce(const SeBwdReduceParams& p, cudaStream_t stream);
cudaError_t se_mlp_bwd(const SeMlpBwdParams& p, cudaStream_t stream);
cudaError_t se_bwd_apply(const SeBwdApplyParams& p, cudaStream_t stream);

cudaError_t line_conv_forward(const LineConvParams& p, cudaStream_t stream);
cudaError_t line_conv_wgrad(const LineConvWgradParams& p, cudaStream_t stream);

}  // namespace msff

// Op schemas of the msff CUDA backend and the Python module init of msff._C.
//
// The public ops msff::lk_conv / msff::lkam_se (and their _..._backward ops) are defined in Python
// (msff/ops/, torch.library.custom_op); per msff/ops/SPEC.md the compiled backend defines its own
// ops with a `_cuda` suffix, same arguments minus the trailing `backend` string, and
// msff/ops/_cuda.py registers them as the "cuda" implementation. This file is always compiled
// (also without nvcc), so the schemas exist everywhere; the CUDA kernels are registered by
// cuda_ops.cpp only in CUDA builds (MSFF_WITH_CUDA).
#include <Python.h>
#include <torch/library.h>

#include <atomic>
#include <string>
#include <vector>

#include "conv_request.h"
#include "cuda/line_conv_plan.h"
#include "cuda/pointwise_plan.h"

namespace msff {
namespace {
std::atomic<int> g_conv_request_default{0};
}  // namespace
int conv_request_default() { return g_conv_request_default.load(); }
}  // namespace msff

namespace {

// msff::_cuda_conv_default(name): the lk_conv kernels the CUDA backend uses when MSFF_CUDA_CONV is
// unset. "" only reads it; a name sets it. Returns the previous (= current, for "") name.
std::string cuda_conv_default(const std::string& name) {
  using namespace msff;
  if (name.empty()) return kConvRequestNames[conv_request_default()];
  const int i = conv_request_index(name.c_str());
  TORCH_CHECK(i >= 0, "the CUDA conv kernel must be one of generic, tc, tc-cpasync, sm80, got '", name, "'");
  return kConvRequestNames[g_conv_request_default.exchange(i)];
}

// The launch plan of the tensor-core line-convolution kernels for one shape (the same functions
// their launchers call), for the offline kernel report; plain arithmetic, no GPU needed.
// Returns [fwd_bm, fwd_bn, fwd_threads, fwd_smem_bytes, fwd_grid_x, fwd_grid_y,
//          wgrad_bm(co), wgrad_bn(ci), wgrad_pixels, wgrad_threads, wgrad_smem_bytes,
//          wgrad_grid_x, wgrad_grid_y, wgrad_splits, wgrad_kmax]; fwd_bn = 0: no tile fits.
// cc: the device's compute capability x 10; 90 plans the wgmma kernels (tc / tc-cpasync on
// Hopper), anything else the mma.sync kernel (which may take the 64-pixel tile).
std::vector<int64_t> lk_conv_cuda_plan(int64_t N, int64_t Cin, int64_t Cout, int64_t H, int64_t W, int64_t K,
                                       int64_t axis, int64_t smem_optin, int64_t num_sms, int64_t cc) {
  using namespace msff;
  const TcFwdPlan f = tc_fwd_plan(static_cast<int>(N), static_cast<int>(Cin), static_cast<int>(Cout),
                                  static_cast<int>(H), static_cast<int>(W), static_cast<int>(K),
                                  static_cast<int>(axis), static_cast<int>(smem_optin), static_cast<int>(num_sms),
                                  cc != 90);
  const TcWgradPlan w = tc_wgrad_plan(static_cast<int>(N), static_cast<int>(Cin), static_cast<int>(Cout),
                                      static_cast<int>(H), static_cast<int>(W), static_cast<int>(K),
                                      static_cast<int>(axis), static_cast<int>(num_sms));
  return {f.bm, f.bn, TC_THREADS, f.smem, f.grid_x, f.grid_y, WG_CO, WG_CI, WG_S, WG_THREADS,
          w.smem, w.co_tiles, w.ci_tiles, w.splits, WG_KMAX};
}

// The launch plan of the pointwise / SE kernels (csrc/cuda/pointwise.cu) for an (N, C, H, W)
// activation: [channels_per_cta, pixels_per_subtile, threads, grid_x (pixel blocks per image),
// grid_y (channel tiles), grid_z (N), span (pixels per CTA), partial_elems (fp64 partials per
// reduced quantity), vector_elems_bf16, vector_elems_fp32].
std::vector<int64_t> pointwise_cuda_plan(int64_t N, int64_t C, int64_t H, int64_t W) {
  using namespace msff;
  const PwPlan p = pw_plan(static_cast<int>(N), static_cast<int>(C), static_cast<int>(H), static_cast<int>(W));
  return {PW_TC, PW_TP, PW_THREADS, p.pblocks, p.ctiles, p.ctiles > 0 ? N : 0, p.span, p.partial_elems,
          pw_vec_width(2), pw_vec_width(4)};
}

// The sm_90a TMA forward's halo tensor map and pipeline for one activation (the same functions
// the launcher encodes and plans with; csrc/cuda/line_conv_plan.h). Strides in elements.
// Returns [dims[4] (innermost first: C, L, lines, N), strides_bytes[3], box[4], chunks, box_bytes,
// chunk_bytes, ok, stages, smem_bytes, stage_bytes, threads] for the channel tile bn.
std::vector<int64_t> lk_conv_cuda_tma_plan(int64_t N, int64_t C, int64_t H, int64_t W, int64_t sn, int64_t sc,
                                           int64_t sh, int64_t sw, int64_t K, int64_t axis, int64_t bn,
                                           int64_t smem_optin) {
  using namespace msff;
  const TmaHaloDesc d = tma_halo_desc(static_cast<int>(N), static_cast<int>(C), static_cast<int>(H),
                                      static_cast<int>(W), sn, sc, sh, sw, static_cast<int>(K), static_cast<int>(axis),
                                      2, 0);
  const TmaGeo g = tma_geometry(static_cast<int>(C), static_cast<int>(K), static_cast<int>(bn),
                                static_cast<int>(smem_optin));
  std::vector<int64_t> v;
  for (uint64_t x : d.dims) v.push_back(static_cast<int64_t>(x));
  for (uint64_t x : d.strides) v.push_back(static_cast<int64_t>(x));
  for (uint32_t x : d.box) v.push_back(x);
  v.insert(v.end(), {d.chunks, d.box_bytes, d.chunk_bytes, d.ok ? 1 : 0, g.stages, g.total, g.stage_bytes,
                     TMA_THREADS});
  return v;
}

}  // namespace

TORCH_LIBRARY(msff, m) {
  m.def(
      "lk_conv_cuda(Tensor x, Tensor weight, Tensor? bias, Tensor? in_scale, Tensor? in_shift, "
      "Tensor? add, bool relu, bool stats) -> (Tensor y, Tensor ch_sum, Tensor ch_m2)");
  m.def(
      "_lk_conv_backward_cuda(Tensor grad_y, Tensor? grad_sum, Tensor? grad_sumsq, Tensor x, "
      "Tensor weight, Tensor y, Tensor? bias, Tensor? in_scale, Tensor? in_shift, Tensor? add, "
      "bool relu, bool[6] output_mask) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, "
      "Tensor grad_in_scale, Tensor grad_in_shift, Tensor grad_add)");
  m.def(
      "lkam_se_cuda(Tensor fa, Tensor? fb, Tensor? scale_a, Tensor? shift_a, Tensor? scale_b, "
      "Tensor? shift_b, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor residual, "
      "Tensor? res_scale, Tensor? res_shift) -> (Tensor out, Tensor pooled)");
  m.def(
      "_lkam_se_backward_cuda(Tensor grad_out, Tensor? grad_pooled, Tensor pooled, Tensor fa, "
      "Tensor? fb, Tensor? scale_a, Tensor? shift_a, Tensor? scale_b, Tensor? shift_b, Tensor w1, "
      "Tensor b1, Tensor w2, Tensor b2, Tensor residual, Tensor? res_scale, Tensor? res_shift) -> "
      "(Tensor grad_fa, Tensor grad_fb, Tensor grad_scale_a, Tensor grad_shift_a, "
      "Tensor grad_scale_b, Tensor grad_shift_b, Tensor grad_w1, Tensor grad_b1, Tensor grad_w2, "
      "Tensor grad_b2, Tensor grad_residual, Tensor grad_res_scale, Tensor grad_res_shift)");
  m.def(
      "_lk_conv_cuda_plan(int N, int Cin, int Cout, int H, int W, int K, int axis, int smem_optin, "
      "int num_sms, int cc=90) -> int[]",
      &lk_conv_cuda_plan);
  m.def("_pointwise_cuda_plan(int N, int C, int H, int W) -> int[]", &pointwise_cuda_plan);
  m.def(
      "_lk_conv_cuda_tma_plan(int N, int C, int H, int W, int sn, int sc, int sh, int sw, int K, int axis, "
      "int bn, int smem_optin) -> int[]",
      &lk_conv_cuda_tma_plan);
  m.def("_cuda_conv_default(str name) -> str", &cuda_conv_default);
}

// `import msff._C` loads this library (and so runs the registrations above). The module carries
// what the build decided, for msff.ops._cuda and `python -m msff.env`.
namespace {

#ifndef MSFF_WITH_CUDA
#define MSFF_WITH_CUDA 0
#endif

PyModuleDef msff_c_module = {
    PyModuleDef_HEAD_INIT,
    "msff._C",
    "Compiled msff ops: op schemas (always) and CUDA kernels (when WITH_CUDA).",
    -1,
    nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&msff_c_module);
  if (mod == nullptr) return nullptr;
  if (PyModule_AddIntConstant(mod, "WITH_CUDA", MSFF_WITH_CUDA) < 0) {
    Py_DECREF(mod);
    return nullptr;
  }
#ifdef MSFF_CUDA_VERSION
  // nvcc's version at build time, as 1000 * major + 10 * minor (13.0 -> 13000).
  if (PyModule_AddIntConstant(mod, "CUDA_VERSION", MSFF_CUDA_VERSION) < 0) {
    Py_DECREF(mod);
    return nullptr;
  }
#endif
  return mod;
}

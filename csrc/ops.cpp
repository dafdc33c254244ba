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

TORCH_LIBRARY(msff, m) {
  m.def(
      "lk_conv_cuda(Tensor x, Tensor weight, Tensor? bias, Tensor? in_scale, Tensor? in_shift, "
      "Tensor? add, bool relu, bool stats) -> (Tensor y, Tensor ch_sum, Tensor ch_sumsq)");
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

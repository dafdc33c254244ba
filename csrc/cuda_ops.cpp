// Torch glue of the CUDA backend: input checks, output allocation (SPEC.md layout rule), launches
// on the current stream, and the TORCH_LIBRARY_IMPL(msff, CUDA) registrations. The kernels live in
// csrc/cuda/*.cu behind the torch-free interface of msff_cuda.h.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <tuple>
#include <vector>

#include "conv_request.h"
#include "cuda/line_conv_plan.h"
#include "cuda/pointwise_plan.h"
#include "msff_cuda.h"

namespace msff {
namespace {

using at::Tensor;
using c10::optional;

constexpr int64_t kMaxKernel = 31;   // the line-conv halo buffer is sized for k <= 31
constexpr int64_t kMaxGridZ = 65535;  // batch size limit of the pointwise kernels (grid.z)

const char* dtype_name(at::ScalarType t) { return c10::toString(t); }

DType to_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", dtype_name(t.scalar_type()));
  }
  return DType::kFloat32;
}

void check_act(const Tensor& t, const char* name, const Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got a tensor on ", t.device());
  TORCH_CHECK(t.device() == ref.device(), name, " must be on ", ref.device(), " like the other inputs, got ",
              t.device());
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D (N, C, H, W), got ", t.dim(), "-D");
}

void check_same_act(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name,
                    int64_t channels) {
  check_act(t, name, ref);
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
              dtype_name(ref.scalar_type()), "), got ", dtype_name(t.scalar_type()));
  TORCH_CHECK(t.size(0) == ref.size(0) && t.size(1) == channels && t.size(2) == ref.size(2) &&
                  t.size(3) == ref.size(3),
              name, " must have shape (", ref.size(0), ", ", channels, ", ", ref.size(2), ", ", ref.size(3),
              "), got ", t.sizes());
}

void check_vec(const optional<Tensor>& t, const char* name, int64_t len, const Tensor& ref,
               bool need_contiguous = true) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device() == ref.device(), name, " must be on ", ref.device(), ", got ", t->device());
  TORCH_CHECK(t->scalar_type() == at::kFloat, name, " must be float32, got ", dtype_name(t->scalar_type()));
  TORCH_CHECK(t->dim() == 1 && t->size(0) == len, name, " must have shape (", len, ",), got ", t->sizes());
  TORCH_CHECK(!need_contiguous || t->is_contiguous(), name, " must be contiguous");
}

void check_mat(const Tensor& t, const char* name, int64_t rows, int64_t cols, const Tensor& ref,
               bool need_contiguous = true) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on ", ref.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", dtype_name(t.scalar_type()));
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name, " must have shape (", rows, ", ",
              cols, "), got ", t.sizes());
  TORCH_CHECK(!need_contiguous || t.is_contiguous(), name, " must be contiguous");
}

void check_pair(const optional<Tensor>& a, const optional<Tensor>& b, const char* na, const char* nb) {
  TORCH_CHECK(a.has_value() == b.has_value(), na, " and ", nb, " must be given together (both or neither)");
}

void check_sizes(const Tensor& t, const char* name) {
  for (int d = 0; d < 4; ++d)
    TORCH_CHECK(t.size(d) <= INT32_MAX, name, " dimension ", d, " is too large (", t.size(d), " > 2^31-1)");
}

// SPEC.md layout rule: channels_last iff ref is channels_last-contiguous and not plain contiguous.
Tensor empty_like_layout(const Tensor& ref, at::IntArrayRef shape, at::ScalarType dtype) {
  const bool cl = !ref.is_contiguous() && ref.is_contiguous(at::MemoryFormat::ChannelsLast);
  return at::empty(shape, ref.options().dtype(dtype),
                   cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

// Incoming gradients may be expanded or strided views: the kernels want them dense.
optional<Tensor> dense(const optional<Tensor>& t) {
  return t.has_value() ? optional<Tensor>(t->contiguous()) : optional<Tensor>();
}

Tensor empty_grad(const Tensor& ref) { return at::empty({0}, ref.options().dtype(at::kFloat)); }

View4 view4(const Tensor& t) { return View4{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }
View4 view4(const optional<Tensor>& t) {
  return t.has_value() ? view4(*t) : View4{nullptr, 0, 0, 0, 0};
}
MutView4 mview4(const Tensor& t) {
  return MutView4{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}
MutView4 no_mview() { return MutView4{nullptr, 0, 0, 0, 0}; }

const float* fptr(const optional<Tensor>& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

// fp64 scratch of the pointwise kernels' per-CTA partials: `reductions` x pw_plan(...).partial_elems.
Tensor pw_partials(const Tensor& ref, int64_t reductions, int64_t N, int64_t C, int64_t H, int64_t W) {
  const PwPlan pl = pw_plan(static_cast<int>(N), static_cast<int>(C), static_cast<int>(H), static_cast<int>(W));
  return at::empty({reductions * pl.partial_elems}, ref.options().dtype(at::kDouble));
}
double* dptr(const Tensor& t) { return t.numel() > 0 ? t.data_ptr<double>() : nullptr; }

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "msff CUDA kernel ", what, " failed to launch: ", cudaGetErrorString(err));
}

Fp32Mode fp32_mode() {
  // SPEC.md: fp32 operands use TF32 iff torch.backends.cudnn.allow_tf32 (the cuDNN conv flag).
  return at::globalContext().allowTF32CuDNN() ? Fp32Mode::kTF32 : Fp32Mode::kExact;
}

int num_sms(int device) {
  static std::mutex mu;
  static std::vector<int> cache;
  std::lock_guard<std::mutex> lock(mu);
  if (device >= static_cast<int>(cache.size())) cache.resize(device + 1, 0);
  if (cache[device] == 0) {
    int v = 0;
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      (void)cudaGetLastError();
      v = 108;
    }
    cache[device] = v;
  }
  return cache[device];
}

// The forward / input-gradient / weight-gradient kernels to ask for: MSFF_CUDA_CONV when set, else
// the process default (msff::_cuda_conv_default; "generic" until set, e.g. from a GPU validation
// record): "generic" (csrc/cuda/line_conv.cu), "tc" (the tensor-core pipeline of this GPU where
// the shape allows: on sm_90a builds on Hopper wgmma fed by TMA + mbarriers, mma.sync on sm_80+;
// csrc/cuda/line_conv_tc.cu), "tc-cpasync" (on Hopper the wgmma pipeline with cp.async staging
// instead of TMA) or "sm80" (the mma.sync pipeline even on Hopper). Read at every call so that
// tests can switch it.
ConvRequest conv_request() {
  const char* v = std::getenv("MSFF_CUDA_CONV");
  if (v == nullptr || *v == '\0') return static_cast<ConvRequest>(conv_request_default());
  const int i = conv_request_index(v);
  TORCH_CHECK(i >= 0, "MSFF_CUDA_CONV must be one of generic, tc, tc-cpasync, sm80, got '", v, "'");
  return static_cast<ConvRequest>(i);
}

// Chooses the kernel of a filled-in line convolution and gives the tensor-core kernels what they
// need: the weight packed (K, Cout, Cin) (from `w_tco`, the (K, Cout', Cin') view of the caller's
// orientation) and the fp64 scratch of their deterministic statistics. The returned tensors must
// outlive the launch.
std::vector<Tensor> prepare_conv_kernel(LineConvParams& p, const Tensor& ref, const Tensor& w_tco) {
  p.num_sms = num_sms(ref.device().index());
  p.kernel = line_conv_choose(p, conv_request());
  if (p.kernel == ConvKernel::kGeneric) return {};
  Tensor wnk = w_tco.contiguous();
  p.w_nk = wnk.data_ptr();
  std::vector<Tensor> keep{wnk};
  if (p.stat0 != nullptr) {
    Tensor part = at::empty({2, p.num_sms, p.Cout}, ref.options().dtype(at::kDouble));
    p.partials = part.data_ptr<double>();
    keep.push_back(part);
  }
  return keep;
}

// Channel sums are accumulated in fp64 (atomics over the whole batch); outputs are fp32.
Tensor sums_to_float(const Tensor& d) { return d.to(at::kFloat); }

// The weight's kernel axis: (Cout, Cin, 1, k) convolves along W (axis 1), (Cout, Cin, k, 1)
// along H (axis 0). Returns k.
int64_t check_weight(const Tensor& weight, const Tensor& x, int* axis) {
  check_act(weight, "weight", x);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight must have the dtype of x (",
              dtype_name(x.scalar_type()), "), got ", dtype_name(weight.scalar_type()));
  TORCH_CHECK(weight.size(1) == x.size(1), "weight must have shape (Cout, ", x.size(1),
              ", 1, k) or (Cout, ", x.size(1), ", k, 1) for x with ", x.size(1), " channels, got ", weight.sizes());
  TORCH_CHECK(weight.size(2) == 1 || weight.size(3) == 1,
              "weight must be a line kernel (Cout, Cin, 1, k) or (Cout, Cin, k, 1), got ", weight.sizes());
  *axis = weight.size(2) == 1 ? 1 : 0;
  const int64_t k = *axis == 1 ? weight.size(3) : weight.size(2);
  TORCH_CHECK(k % 2 == 1 && k >= 1 && k <= kMaxKernel, "kernel size must be odd and in [1, ", kMaxKernel,
              "] for the CUDA backend, got ", k, " (weight ", weight.sizes(), ")");
  return k;
}

// ---- lk_conv ----------------------------------------------------------------------------------
struct LkShapes {
  int64_t N, Cin, Cout, H, W, k;
  int axis;
  DType dt;
};

// The input checks shared by lk_conv and its backward (one place, one set of messages).
LkShapes check_lk_conv_inputs(const Tensor& x, const Tensor& weight, const optional<Tensor>& bias,
                              const optional<Tensor>& in_scale, const optional<Tensor>& in_shift,
                              const optional<Tensor>& add) {
  check_act(x, "x", x);
  LkShapes s{};
  s.dt = to_dtype(x, "x");
  check_sizes(x, "x");
  s.axis = 1;
  s.k = check_weight(weight, x, &s.axis);
  s.N = x.size(0);
  s.Cin = x.size(1);
  s.H = x.size(2);
  s.W = x.size(3);
  s.Cout = weight.size(0);
  check_vec(bias, "bias", s.Cout, x);
  check_pair(in_scale, in_shift, "in_scale", "in_shift");
  check_vec(in_scale, "in_scale", s.Cin, x);
  check_vec(in_shift, "in_shift", s.Cin, x);
  if (add.has_value()) check_same_act(*add, "add", x, "x", s.Cout);
  return s;
}

std::tuple<Tensor, Tensor, Tensor> lk_conv_cuda(const Tensor& x, const Tensor& weight,
                                                const optional<Tensor>& bias,
                                                const optional<Tensor>& in_scale,
                                                const optional<Tensor>& in_shift, const optional<Tensor>& add,
                                                bool relu, bool stats) {
  const LkShapes sh = check_lk_conv_inputs(x, weight, bias, in_scale, in_shift, add);
  const DType dt = sh.dt;
  const int axis = sh.axis;
  const int64_t k = sh.k, N = sh.N, Cin = sh.Cin, H = sh.H, W = sh.W, Cout = sh.Cout;

  c10::cuda::CUDAGuard guard(x.device());
  Tensor y = empty_like_layout(x, {N, Cout, H, W}, x.scalar_type());
  Tensor wp = weight.reshape({Cout, Cin, k}).permute({2, 1, 0}).contiguous();
  Tensor st = stats ? at::zeros({2, Cout}, x.options().dtype(at::kDouble)) : Tensor();

  LineConvParams p{};
  p.x = view4(x);
  p.w = wp.data_ptr();
  p.y = mview4(y);
  p.in_scale = fptr(in_scale);
  p.in_shift = fptr(in_shift);
  p.bias = fptr(bias);
  p.relu = relu ? 1 : 0;
  p.add = view4(add);
  p.epilogue = Epilogue::kConv;
  p.gate_x = View4{nullptr, 0, 0, 0, 0};
  p.stat0 = stats ? st[0].data_ptr<double>() : nullptr;
  p.stat1 = stats ? st[1].data_ptr<double>() : nullptr;
  p.N = static_cast<int>(N);
  p.Cin = static_cast<int>(Cin);
  p.Cout = static_cast<int>(Cout);
  p.H = static_cast<int>(H);
  p.W = static_cast<int>(W);
  p.K = static_cast<int>(k);
  p.axis = axis;
  p.dtype = dt;
  p.fp32_mode = fp32_mode();
  const auto keep = prepare_conv_kernel(p, x, weight.reshape({Cout, Cin, k}).permute({2, 0, 1}));
  check_launch(line_conv_forward(p, c10::cuda::getCurrentCUDAStream(x.device().index())), "lk_conv forward");
  if (!stats) return {y, empty_grad(x), empty_grad(x)};
  // SPEC.md: Σy and the centred M2 = Σ(y - ȳ)², formed from the kernels' fp64 Σy, Σy² before any
  // rounding to fp32 (the tensor-core kernels' per-tile partials are shifted sums, tile_stats in
  // csrc/cuda/line_conv_tc.cu, so only this fp64 cancellation remains).
  const double count = static_cast<double>(std::max<int64_t>(1, N * H * W));
  Tensor m2 = (st[1] - st[0] * st[0] / count).clamp_min(0.0);
  return {y, st[0].to(at::kFloat), m2.to(at::kFloat)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lk_conv_backward_cuda(
    const Tensor& grad_y, const optional<Tensor>& grad_sum_in, const optional<Tensor>& grad_sumsq_in, const Tensor& x,
    const Tensor& weight, const Tensor& y, const optional<Tensor>& bias, const optional<Tensor>& in_scale,
    const optional<Tensor>& in_shift, const optional<Tensor>& add, bool relu, std::array<bool, 6> mask) {
  const LkShapes sh = check_lk_conv_inputs(x, weight, bias, in_scale, in_shift, add);
  const DType dt = sh.dt;
  const int axis = sh.axis;
  const int64_t k = sh.k, N = sh.N, Cin = sh.Cin, H = sh.H, W = sh.W, Cout = sh.Cout;
  TORCH_CHECK(N <= kMaxGridZ, "batch size must be <= ", kMaxGridZ, " for the CUDA backend, got ", N);
  check_same_act(y, "y", x, "x", Cout);
  check_same_act(grad_y, "grad_y", x, "x", Cout);
  check_vec(grad_sum_in, "grad_sum", Cout, x, false);
  check_vec(grad_sumsq_in, "grad_sumsq", Cout, x, false);
  const optional<Tensor> grad_sum = dense(grad_sum_in), grad_sumsq = dense(grad_sumsq_in);

  c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  const bool prologue = in_scale.has_value();
  const bool want_x = mask[0];
  const bool want_w = mask[1];
  const bool want_b = mask[2] && bias.has_value();
  const bool want_ps = prologue && (mask[3] || mask[4]);
  const bool want_add = mask[5] && add.has_value();
  const bool need_gr = want_x || want_w || want_ps;

  Tensor grad_x = empty_grad(x), grad_w = empty_grad(x), grad_b = empty_grad(x);
  Tensor grad_in_scale = empty_grad(x), grad_in_shift = empty_grad(x), grad_add = empty_grad(x);

  // 1) g_r = (grad_y + grad_sum + 2 y grad_sumsq) masked by the epilogue's ReLU; grad_add, grad_bias.
  Tensor g_r;
  Tensor gb = want_b ? at::zeros({Cout}, x.options().dtype(at::kDouble)) : Tensor();
  if (need_gr) g_r = empty_like_layout(y, {N, Cout, H, W}, x.scalar_type());
  if (want_add) grad_add = empty_like_layout(*add, {N, Cout, H, W}, x.scalar_type());
  if (need_gr || want_b || want_add) {
    LkConvBwdPrepParams q{};
    q.grad_y = view4(grad_y);
    q.grad_sum = fptr(grad_sum);
    q.grad_sumsq = fptr(grad_sumsq);
    q.y = view4(y);
    q.add = view4(add);
    q.relu = relu ? 1 : 0;
    q.g_r = need_gr ? mview4(g_r) : no_mview();
    q.grad_add = want_add ? mview4(grad_add) : no_mview();
    q.grad_bias = want_b ? gb.data_ptr<double>() : nullptr;
    const Tensor q_part = want_b ? pw_partials(x, 1, N, Cout, H, W) : Tensor();
    q.partials = want_b ? dptr(q_part) : nullptr;
    q.N = static_cast<int>(N);
    q.C = static_cast<int>(Cout);
    q.H = static_cast<int>(H);
    q.W = static_cast<int>(W);
    q.dtype = dt;
    check_launch(lk_conv_bwd_prep(q, stream), "lk_conv backward (epilogue gradient)");
  }
  if (want_b) grad_b = sums_to_float(gb);

  // 2) grad_xin = "same" conv of g_r with the weight flipped along k and Cin <-> Cout, with the
  //    prologue's backward (ReLU mask, scale, and its channel sums) in the epilogue.
  if (want_x || want_ps) {
    Tensor wt = weight.reshape({Cout, Cin, k}).flip({2}).permute({2, 0, 1}).contiguous();  // (k, Cout, Cin)
    if (want_x) grad_x = empty_like_layout(x, {N, Cin, H, W}, x.scalar_type());
    Tensor ps = want_ps ? at::zeros({2, Cin}, x.options().dtype(at::kDouble)) : Tensor();
    LineConvParams p{};
    p.x = view4(g_r);
    p.w = wt.data_ptr();
    p.y = want_x ? mview4(grad_x) : no_mview();
    p.add = View4{nullptr, 0, 0, 0, 0};
    if (prologue) {
      p.epilogue = Epilogue::kGate;
      p.gate_x = view4(x);
      p.gate_scale = in_scale->data_ptr<float>();
      p.gate_shift = in_shift->data_ptr<float>();
      p.stat0 = want_ps ? ps[0].data_ptr<double>() : nullptr;
      p.stat1 = want_ps ? ps[1].data_ptr<double>() : nullptr;
    } else {
      p.epilogue = Epilogue::kConv;
      p.gate_x = View4{nullptr, 0, 0, 0, 0};
    }
    p.N = static_cast<int>(N);
    p.Cin = static_cast<int>(Cout);
    p.Cout = static_cast<int>(Cin);
    p.H = static_cast<int>(H);
    p.W = static_cast<int>(W);
    p.K = static_cast<int>(k);
    p.axis = axis;
    p.dtype = dt;
    p.fp32_mode = fp32_mode();
    // (K, Cout', Cin') = (k, Cin, Cout) of the flipped kernel
    const auto keep = prepare_conv_kernel(p, x, weight.reshape({Cout, Cin, k}).flip({2}).permute({2, 1, 0}));
    check_launch(line_conv_forward(p, stream), "lk_conv backward (input gradient)");
    if (want_ps) {
      Tensor psf = sums_to_float(ps);
      if (mask[3]) grad_in_scale = psf[0].clone();
      if (mask[4]) grad_in_shift = psf[1].clone();
    }
  }

  // 3) grad_weight[co, ci, t] = sum g_r[co, p] * xin[ci, p + t - k/2], xin recomputed.
  if (want_w) {
    Tensor dw = at::zeros({Cout, Cin, k}, x.options().dtype(at::kFloat));
    LineConvWgradParams p{};
    p.x = view4(x);
    p.g = view4(g_r);
    p.dw = dw.data_ptr<float>();
    p.in_scale = fptr(in_scale);
    p.in_shift = fptr(in_shift);
    p.N = static_cast<int>(N);
    p.Cin = static_cast<int>(Cin);
    p.Cout = static_cast<int>(Cout);
    p.H = static_cast<int>(H);
    p.W = static_cast<int>(W);
    p.K = static_cast<int>(k);
    p.axis = axis;
    p.dtype = dt;
    p.fp32_mode = fp32_mode();
    p.num_sms = num_sms(x.device().index());
    p.kernel = line_conv_wgrad_choose(p, conv_request());
    Tensor part;
    if (p.kernel != ConvKernel::kGeneric) {
      const TcWgradPlan pl = tc_wgrad_plan(p.N, p.Cin, p.Cout, p.H, p.W, p.K, p.axis, p.num_sms);
      part = at::empty({pl.partial_elems}, x.options().dtype(at::kFloat));
      p.partials = part.data_ptr<float>();
    } else if (const int64_t elems = line_conv_wgrad_generic_partial_elems(p); elems > 0) {
      part = at::empty({elems}, x.options().dtype(at::kFloat));  // per-split tiles, summed in order
      p.partials = part.data_ptr<float>();
    }
    check_launch(line_conv_wgrad(p, stream), "lk_conv backward (weight gradient)");
    grad_w = dw.reshape(weight.sizes()).to(weight.scalar_type());
  }
  return {grad_x, grad_w, grad_b, grad_in_scale, grad_in_shift, grad_add};
}

// ---- lkam_se ----------------------------------------------------------------------------------
struct SeShapes {
  int64_t N, C, H, W, Hid;
};

SeShapes check_se(const Tensor& fa, const optional<Tensor>& fb, const optional<Tensor>& scale_a,
                  const optional<Tensor>& shift_a, const optional<Tensor>& scale_b,
                  const optional<Tensor>& shift_b, const Tensor& w1, const Tensor& b1, const Tensor& w2,
                  const Tensor& b2, const Tensor& residual, const optional<Tensor>& res_scale,
                  const optional<Tensor>& res_shift) {
  check_act(fa, "fa", fa);
  to_dtype(fa, "fa");
  check_sizes(fa, "fa");
  SeShapes s{fa.size(0), fa.size(1), fa.size(2), fa.size(3), w1.dim() == 2 ? w1.size(0) : -1};
  TORCH_CHECK(s.N <= kMaxGridZ, "batch size must be <= ", kMaxGridZ, " for the CUDA backend, got ", s.N);
  if (fb.has_value()) check_same_act(*fb, "fb", fa, "fa", s.C);
  TORCH_CHECK(!(scale_b.has_value() && !fb.has_value()), "scale_b/shift_b given without fb");
  check_pair(scale_a, shift_a, "scale_a", "shift_a");
  check_pair(scale_b, shift_b, "scale_b", "shift_b");
  check_pair(res_scale, res_shift, "res_scale", "res_shift");
  check_vec(scale_a, "scale_a", s.C, fa);
  check_vec(shift_a, "shift_a", s.C, fa);
  check_vec(scale_b, "scale_b", s.C, fa);
  check_vec(shift_b, "shift_b", s.C, fa);
  check_vec(res_scale, "res_scale", s.C, fa);
  check_vec(res_shift, "res_shift", s.C, fa);
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == s.C, "w1 must have shape (Hid, ", s.C, "), got ", w1.sizes());
  check_mat(w1, "w1", s.Hid, s.C, fa);
  check_vec(b1, "b1", s.Hid, fa);
  check_mat(w2, "w2", s.C, s.Hid, fa);
  check_vec(b2, "b2", s.C, fa);
  check_same_act(residual, "residual", fa, "fa", s.C);
  TORCH_CHECK(2 * (s.C + s.Hid) * 4 <= 48 * 1024, "channels + hidden channels of the SE must be <= 6144 ",
              "for the CUDA backend, got ", s.C, " + ", s.Hid);
  return s;
}

BranchPair branch_pair(const Tensor& fa, const optional<Tensor>& fb, const optional<Tensor>& scale_a,
                       const optional<Tensor>& shift_a, const optional<Tensor>& scale_b,
                       const optional<Tensor>& shift_b) {
  return BranchPair{view4(fa), view4(fb), fptr(scale_a), fptr(shift_a), fptr(scale_b), fptr(shift_b)};
}

std::tuple<Tensor, Tensor> lkam_se_cuda(const Tensor& fa, const optional<Tensor>& fb,
                                        const optional<Tensor>& scale_a, const optional<Tensor>& shift_a,
                                        const optional<Tensor>& scale_b, const optional<Tensor>& shift_b,
                                        const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2,
                                        const Tensor& residual, const optional<Tensor>& res_scale,
                                        const optional<Tensor>& res_shift) {
  const SeShapes s =
      check_se(fa, fb, scale_a, shift_a, scale_b, shift_b, w1, b1, w2, b2, residual, res_scale, res_shift);
  c10::cuda::CUDAGuard guard(fa.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(fa.device().index());
  const DType dt = to_dtype(fa, "fa");
  const BranchPair f = branch_pair(fa, fb, scale_a, shift_a, scale_b, shift_b);
  Tensor pooled = at::zeros({s.N, s.C}, fa.options().dtype(at::kFloat));
  Tensor z = at::empty({s.N, s.C}, fa.options().dtype(at::kFloat));
  Tensor out = empty_like_layout(fa, {s.N, s.C, s.H, s.W}, fa.scalar_type());
  const int N = static_cast<int>(s.N), C = static_cast<int>(s.C), H = static_cast<int>(s.H),
            W = static_cast<int>(s.W), Hid = static_cast<int>(s.Hid);

  const Tensor pool_part = pw_partials(fa, 1, s.N, s.C, s.H, s.W);
  check_launch(se_pool(SePoolParams{f, pooled.data_ptr<float>(), N, C, H, W, dt, dptr(pool_part), 0, 0}, stream),
               "lkam_se pool");
  check_launch(se_excite(SeExciteParams{pooled.data_ptr<float>(), w1.data_ptr<float>(), b1.data_ptr<float>(),
                                        w2.data_ptr<float>(), b2.data_ptr<float>(), z.data_ptr<float>(), N, C, Hid},
                         stream),
               "lkam_se excite");
  check_launch(se_apply(SeApplyParams{f, z.data_ptr<float>(), view4(residual), fptr(res_scale), fptr(res_shift),
                                      mview4(out), N, C, H, W, dt, 0, 0},
                        stream),
               "lkam_se scale + residual");
  return {out, pooled};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
lkam_se_backward_cuda(const Tensor& grad_out, const optional<Tensor>& grad_pooled, const Tensor& pooled,
                      const Tensor& fa, const optional<Tensor>& fb, const optional<Tensor>& scale_a,
                      const optional<Tensor>& shift_a, const optional<Tensor>& scale_b,
                      const optional<Tensor>& shift_b, const Tensor& w1, const Tensor& b1, const Tensor& w2,
                      const Tensor& b2, const Tensor& residual, const optional<Tensor>& res_scale,
                      const optional<Tensor>& res_shift) {
  const SeShapes s =
      check_se(fa, fb, scale_a, shift_a, scale_b, shift_b, w1, b1, w2, b2, residual, res_scale, res_shift);
  check_same_act(grad_out, "grad_out", fa, "fa", s.C);
  check_mat(pooled, "pooled", s.N, s.C, fa, false);
  if (grad_pooled.has_value()) check_mat(*grad_pooled, "grad_pooled", s.N, s.C, fa, false);
  c10::cuda::CUDAGuard guard(fa.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(fa.device().index());
  const DType dt = to_dtype(fa, "fa");
  const BranchPair f = branch_pair(fa, fb, scale_a, shift_a, scale_b, shift_b);
  const int N = static_cast<int>(s.N), C = static_cast<int>(s.C), H = static_cast<int>(s.H),
            W = static_cast<int>(s.W), Hid = static_cast<int>(s.Hid);
  const auto f32 = fa.options().dtype(at::kFloat);
  const auto f64 = fa.options().dtype(at::kDouble);

  // 1) gz = sum_hw grad_out * F; grad_residual; residual-BN channel sums.
  Tensor gz = at::zeros({s.N, s.C}, f32);
  Tensor grad_residual = empty_like_layout(residual, {s.N, s.C, s.H, s.W}, residual.scalar_type());
  const bool res_bn = res_scale.has_value();
  Tensor rs = res_bn ? at::zeros({2, s.C}, f64) : Tensor();
  SeBwdReduceParams r{};
  r.grad_out = view4(grad_out);
  r.f = f;
  r.residual = view4(residual);
  r.res_scale = fptr(res_scale);
  r.grad_residual = mview4(grad_residual);
  r.gz = gz.data_ptr<float>();
  r.grad_res_scale = res_bn ? rs[0].data_ptr<double>() : nullptr;
  r.grad_res_shift = res_bn ? rs[1].data_ptr<double>() : nullptr;
  r.N = N;
  r.C = C;
  r.H = H;
  r.W = W;
  r.dtype = dt;
  const Tensor r_part = pw_partials(fa, res_bn ? 3 : 1, s.N, s.C, s.H, s.W);
  r.partials = dptr(r_part);
  check_launch(se_bwd_reduce(r, stream), "lkam_se backward (reduce)");

  // 2) the SE MLP backward.
  Tensor gp = at::empty({s.N, s.C}, f32);
  Tensor grad_w1 = at::zeros_like(w1), grad_b1 = at::zeros_like(b1);
  Tensor grad_w2 = at::zeros_like(w2), grad_b2 = at::zeros_like(b2);
  Tensor pooled_c = pooled.contiguous();
  SeMlpBwdParams m{};
  m.pooled = pooled_c.data_ptr<float>();
  m.gz = gz.data_ptr<float>();
  Tensor gpooled_c = grad_pooled.has_value() ? grad_pooled->contiguous() : Tensor();
  m.grad_pooled = grad_pooled.has_value() ? gpooled_c.data_ptr<float>() : nullptr;
  m.w1 = w1.data_ptr<float>();
  m.b1 = b1.data_ptr<float>();
  m.w2 = w2.data_ptr<float>();
  m.b2 = b2.data_ptr<float>();
  m.gp = gp.data_ptr<float>();
  m.grad_w1 = grad_w1.data_ptr<float>();
  m.grad_b1 = grad_b1.data_ptr<float>();
  m.grad_w2 = grad_w2.data_ptr<float>();
  m.grad_b2 = grad_b2.data_ptr<float>();
  m.N = N;
  m.C = C;
  m.Hid = Hid;
  Tensor mlp_scratch = at::empty({s.N * (s.C + 2 * s.Hid)}, f32);
  m.scratch = mlp_scratch.data_ptr<float>();
  check_launch(se_mlp_bwd(m, stream), "lkam_se backward (SE MLP)");

  // 3) gF = grad_out * z + gp / HW, through each branch's BN-affine + ReLU. z is recomputed
  //    from pooled by the excite kernel (N × C, negligible).
  Tensor z = at::empty({s.N, s.C}, f32);
  check_launch(se_excite(SeExciteParams{pooled_c.data_ptr<float>(), w1.data_ptr<float>(), b1.data_ptr<float>(),
                                        w2.data_ptr<float>(), b2.data_ptr<float>(), z.data_ptr<float>(), N, C, Hid},
                         stream),
               "lkam_se backward (excite recompute)");
  Tensor grad_fa = empty_like_layout(fa, {s.N, s.C, s.H, s.W}, fa.scalar_type());
  Tensor grad_fb = fb.has_value() ? empty_like_layout(*fb, {s.N, s.C, s.H, s.W}, fa.scalar_type()) : empty_grad(fa);
  const bool bn_a = scale_a.has_value(), bn_b = scale_b.has_value();
  Tensor sa = bn_a ? at::zeros({2, s.C}, f64) : Tensor();
  Tensor sb = bn_b ? at::zeros({2, s.C}, f64) : Tensor();
  SeBwdApplyParams a{};
  a.grad_out = view4(grad_out);
  a.f = f;
  a.z = z.data_ptr<float>();
  a.gp = gp.data_ptr<float>();
  a.grad_fa = mview4(grad_fa);
  a.grad_fb = fb.has_value() ? mview4(grad_fb) : no_mview();
  a.grad_scale_a = bn_a ? sa[0].data_ptr<double>() : nullptr;
  a.grad_shift_a = bn_a ? sa[1].data_ptr<double>() : nullptr;
  a.grad_scale_b = bn_b ? sb[0].data_ptr<double>() : nullptr;
  a.grad_shift_b = bn_b ? sb[1].data_ptr<double>() : nullptr;
  a.N = N;
  a.C = C;
  a.H = H;
  a.W = W;
  a.dtype = dt;
  const Tensor a_part = (bn_a || bn_b) ? pw_partials(fa, 4, s.N, s.C, s.H, s.W) : Tensor();
  a.partials = (bn_a || bn_b) ? dptr(a_part) : nullptr;
  check_launch(se_bwd_apply(a, stream), "lkam_se backward (apply)");

  Tensor e = empty_grad(fa);
  Tensor saf = bn_a ? sums_to_float(sa) : Tensor();
  Tensor sbf = bn_b ? sums_to_float(sb) : Tensor();
  Tensor rsf = res_bn ? sums_to_float(rs) : Tensor();
  return {grad_fa,
          grad_fb,
          bn_a ? saf[0].clone() : e,
          bn_a ? saf[1].clone() : e,
          bn_b ? sbf[0].clone() : e,
          bn_b ? sbf[1].clone() : e,
          grad_w1,
          grad_b1,
          grad_w2,
          grad_b2,
          grad_residual,
          res_bn ? rsf[0].clone() : e,
          res_bn ? rsf[1].clone() : e};
}

}  // namespace
}  // namespace msff

TORCH_LIBRARY_IMPL(msff, CUDA, m) {
  m.impl("lk_conv_cuda", &msff::lk_conv_cuda);
  m.impl("_lk_conv_backward_cuda", &msff::lk_conv_backward_cuda);
  m.impl("lkam_se_cuda", &msff::lkam_se_cuda);
  m.impl("_lkam_se_backward_cuda", &msff::lkam_se_backward_cuda);
}

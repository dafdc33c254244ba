// Device helpers shared by the msff CUDA kernels (CUDA runtime headers only; no torch).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <stdint.h>

#include "msff_cuda.h"

namespace msff {

template <typename T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Offset in elements of (n, c, h, w) in a View4/MutView4.
template <typename V>
__device__ __forceinline__ int64_t offset4(const V& v, int64_t n, int64_t c, int64_t h, int64_t w) {
  return n * v.sn + c * v.sc + h * v.sh + w * v.sw;
}

// Per-dtype tile configuration of the tensor-core line convolution.
//   BK: input channels per K-chunk; KF: the wmma k of one mma; SKEW: padding of shared rows so
//   that every fragment pointer stays 32-byte aligned (rows are a multiple of 32 bytes long) and
//   consecutive rows start in different banks.
template <typename T>
struct TileCfg;
template <>
struct TileCfg<__half> {
  static constexpr int BK = 32, KF = 16, SKEW = 16;
};
template <>
struct TileCfg<__nv_bfloat16> {
  static constexpr int BK = 32, KF = 16, SKEW = 16;
};
template <>
struct TileCfg<float> {
  static constexpr int BK = 16, KF = 8, SKEW = 8;
};

// wmma fragment element type for T (fp32 runs as TF32).
template <typename T>
struct WmmaElem {
  using type = T;
};
template <>
struct WmmaElem<float> {
  using type = nvcuda::wmma::precision::tf32;
};

// acc += a * b for TF32 fragments. kExact adds the two correction products of the 3xTF32 split
// (a = a_hi + a_lo, b = b_hi + b_lo; the a_lo*b_lo term is below fp32 rounding), kTF32 rounds once.
template <typename FragA, typename FragB, typename FragC>
__device__ __forceinline__ void mma_acc_tf32(FragC& acc, FragA& a, FragB& b, Fp32Mode mode) {
  using namespace nvcuda;
  if (mode == Fp32Mode::kExact) {
    FragA a_lo;
    FragB b_lo;
#pragma unroll
    for (int i = 0; i < a.num_elements; ++i) {
      float hi = wmma::__float_to_tf32(a.x[i]);
      a_lo.x[i] = wmma::__float_to_tf32(a.x[i] - hi);
      a.x[i] = hi;
    }
#pragma unroll
    for (int i = 0; i < b.num_elements; ++i) {
      float hi = wmma::__float_to_tf32(b.x[i]);
      b_lo.x[i] = wmma::__float_to_tf32(b.x[i] - hi);
      b.x[i] = hi;
    }
    wmma::mma_sync(acc, a_lo, b, acc);
    wmma::mma_sync(acc, a, b_lo, acc);
    wmma::mma_sync(acc, a, b, acc);
  } else {
#pragma unroll
    for (int i = 0; i < a.num_elements; ++i) a.x[i] = wmma::__float_to_tf32(a.x[i]);
#pragma unroll
    for (int i = 0; i < b.num_elements; ++i) b.x[i] = wmma::__float_to_tf32(b.x[i]);
    wmma::mma_sync(acc, a, b, acc);
  }
}

template <typename T>
struct Mma {
  template <typename FragA, typename FragB, typename FragC>
  static __device__ __forceinline__ void run(FragC& acc, FragA& a, FragB& b, Fp32Mode) {
    nvcuda::wmma::mma_sync(acc, a, b, acc);
  }
};
template <>
struct Mma<float> {
  template <typename FragA, typename FragB, typename FragC>
  static __device__ __forceinline__ void run(FragC& acc, FragA& a, FragB& b, Fp32Mode mode) {
    mma_acc_tf32(acc, a, b, mode);
  }
};

// The tensor-core forward / input-gradient kernels (line_conv_tc.cu), for p.kernel != kGeneric.
cudaError_t line_conv_tc_forward(const LineConvParams& p, cudaStream_t stream);
// The tensor-core weight gradient (line_conv_tc.cu), for p.kernel != kGeneric.
cudaError_t line_conv_wgrad_tc(const LineConvWgradParams& p, cudaStream_t stream);

// ---- 16-byte cp.async (sm_80+) -------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy, L2 only (operands are reused from shared memory, not L1).
// valid = false copies 0 bytes and zero-fills the 16 destination bytes ("same" padding, tails);
// src must still be a mapped address (callers pass the tensor's base then).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Wait until at most N of this thread's committed groups are pending. It orders only this
// thread's copies: a __syncthreads must follow before other threads read what landed.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Launch error of the last kernel, or of a failed configuration call before it.
inline cudaError_t last_error() { return cudaGetLastError(); }

}  // namespace msff

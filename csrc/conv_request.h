// Which lk_conv kernels the CUDA backend asks for (csrc/msff_cuda.h: ConvRequest): the names,
// the process-wide default (msff::_cuda_conv_default, set from Python by
// msff.ops._cuda.set_conv_kernel_default, e.g. from a GPU validation record) and the
// MSFF_CUDA_CONV environment variable, which wins over the default. Plain C++: ops.cpp (always
// built) owns the default; cuda_ops.cpp reads it.
#pragma once

#include <cstring>

namespace msff {

// Index = ConvRequest value: kGeneric, kBest ("tc"), kSm80, kCpAsync ("tc-cpasync").
constexpr const char* kConvRequestNames[] = {"generic", "tc", "sm80", "tc-cpasync"};
constexpr int kConvRequestCount = 4;

// The ConvRequest value of `name`, -1 if it is not one.
inline int conv_request_index(const char* name) {
  for (int i = 0; i < kConvRequestCount; ++i)
    if (std::strcmp(name, kConvRequestNames[i]) == 0) return i;
  return -1;
}

// The process default (index into kConvRequestNames; initially 0 = "generic"), thread-safe.
int conv_request_default();

}  // namespace msff

// The portable variant of the CPU kernels: compiled with the build's own flags (on x86-64, SSE2),
// with 16-byte vectors.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "masked_attention_cpu_kernel.h"

namespace hmait_cpu {
namespace isa_default {
#define HMAIT_VECTOR_BYTES 16
#include "masked_attention_cpu_kernel_impl.h"
#undef HMAIT_VECTOR_BYTES
}  // namespace isa_default

KernelFn kernel_default() { return &isa_default::run; }

}  // namespace hmait_cpu

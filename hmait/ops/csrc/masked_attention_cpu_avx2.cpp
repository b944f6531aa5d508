// The AVX2 + FMA + F16C (x86-64-v3) variant of the CPU kernels, selected at run time when the CPU has it.
//
// The instruction set is enabled with a pragma around the kernel code only: every header is
// included before it, so no inline function of the standard library is compiled with these
// instructions (the linker could otherwise pick that copy for code running on an older CPU).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "masked_attention_cpu_kernel.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define HMAIT_HAS_ISA_VARIANT 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")
namespace hmait_cpu {
namespace isa_avx2 {
#define HMAIT_VECTOR_BYTES 32
#include "masked_attention_cpu_kernel_impl.h"
#undef HMAIT_VECTOR_BYTES
}  // namespace isa_avx2
}  // namespace hmait_cpu
#pragma GCC pop_options
#endif

namespace hmait_cpu {

#ifdef HMAIT_HAS_ISA_VARIANT
KernelFn kernel_avx2() { return &isa_avx2::run; }
#else
// Other compilers and architectures use the portable variant only.
KernelFn kernel_avx2() { return nullptr; }
#endif

}  // namespace hmait_cpu

// The AVX-512 variant with the AVX-512 BF16 dot product (Zen 4, Cooper Lake, Sapphire Rapids and later),
// selected at run time when the CPU has it. It differs from the AVX-512 variant only in the bfloat16
// fast path: each dot product of two rows takes one vdpbf16ps per 32 channels (the products of
// a channel pair added to a float32 lane), where that variant widens both rows to float32 and
// multiplies-adds even and odd channels apart. Products of bfloat16 values are exact in float32;
// the instruction treats subnormal inputs and results as zero.
//
// As in the other variants, every header is included before the instruction set is enabled.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "masked_attention_cpu_kernel.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 10
#include <immintrin.h>
#define HMAIT_HAS_ISA_VARIANT 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512cd,avx512bf16,avx2,fma,f16c,bmi,bmi2,popcnt,prefer-vector-width=512")
namespace hmait_cpu {
namespace isa_avx512_bf16 {
#define HMAIT_VECTOR_BYTES 64
// acc + the products of the bfloat16 channel pairs in the 32-bit lanes of a and b (VecBits32 each).
#define HMAIT_BF16_DOT(acc, a, b)                                                                     \
  bit_cast_to<VecFloat>(_mm512_dpbf16_ps(bit_cast_to<__m512>(acc), bit_cast_to<__m512bh>(a),        \
                                         bit_cast_to<__m512bh>(b)))
#include "masked_attention_cpu_kernel_impl.h"
#undef HMAIT_BF16_DOT
#undef HMAIT_VECTOR_BYTES
}  // namespace isa_avx512_bf16
}  // namespace hmait_cpu
#pragma GCC pop_options
#endif

namespace hmait_cpu {

#ifdef HMAIT_HAS_ISA_VARIANT
KernelFn kernel_avx512_bf16() { return &isa_avx512_bf16::run; }
#else
// Other compilers and architectures use the other variants only.
KernelFn kernel_avx512_bf16() { return nullptr; }
#endif

}  // namespace hmait_cpu

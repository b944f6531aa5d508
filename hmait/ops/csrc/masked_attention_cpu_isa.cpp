// What the op layers of the CPU kernels share (torch's in masked_attention_cpu.cpp, OpenVINO's in
// masked_attention_openvino.cpp): the choice of the instruction-set variant and the work split.
// Torch-free, so that a runtime without torch can build it.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "masked_attention_cpu_kernel.h"

namespace hmait_cpu {

KernelFn kernel_for(int isa) {
  switch (isa) {
    case 3: return kernel_avx512_bf16();
    case 2: return kernel_avx512();
    case 1: return kernel_avx2();
    default: return kernel_default();
  }
}

namespace {

bool cpu_supports(int isa) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  if (isa == 3) {
#if !defined(__clang__) && __GNUC__ >= 10
    return cpu_supports(2) && __builtin_cpu_supports("avx512bf16");
#else
    return false;  // the variant is built by GCC 10 or later only
#endif
  }
  if (isa == 2)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("bmi2");
  if (isa == 1)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
#endif
  return isa == 0;
}

}  // namespace

bool isa_usable(int isa) { return kernel_for(isa) != nullptr && cpu_supports(isa); }

int best_isa() {
  // ATEN_CPU_CAPABILITY caps torch's own kernels; it caps these the same way ('avx512' allows both
  // AVX-512 variants).
  int cap = 3;
  if (const char* env = std::getenv("ATEN_CPU_CAPABILITY")) {
    const std::string value(env);
    if (value == "default") cap = 0;
    else if (value == "avx2") cap = 1;
  }
  for (int isa = cap; isa > 0; --isa)
    if (isa_usable(isa)) return isa;
  return 0;
}

// Aim for chunks of about 32k multiply-adds.
int64_t grid_grain(const Args& args) {
  const int64_t per_item = (args.mask_size * args.mask_size + args.num_prefix) * (args.head_dim + args.value_dim);
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(per_item, 1));
}

int64_t global_chunk(int64_t batch_heads, int64_t queries) {
  const int64_t per_bh = std::max<int64_t>(1, std::min((64 + batch_heads - 1) / batch_heads, (queries + 63) / 64));
  return (queries + per_bh - 1) / per_bh;
}

}  // namespace hmait_cpu

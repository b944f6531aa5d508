// The interface between the op layer (masked_attention_cpu.cpp, which knows torch) and the
// compute kernels (one translation unit per instruction set, which know only plain C++).
//
// Keeping torch out of the kernel translation units matters for two reasons: they compile in a
// few seconds, and they can be compiled for AVX2 / AVX-512 without risking that an inline
// function from a torch header gets emitted with those instructions and then picked by the
// linker for a caller on a CPU without them.
#pragma once

#include <cstdint>

namespace hmait_cpu {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// A (B, N, heads, C) tensor read or written through its strides (in elements); the last dimension is
// contiguous.
struct View {
  const void* data = nullptr;
  int64_t stride_b = 0;
  int64_t stride_n = 0;
  int64_t stride_h = 0;
};

// Everything a stage needs. Token n of a (B, N, ...) tensor is a prefix token for n < num_prefix and
// grid position g = n - num_prefix, at (g / w, g % w), otherwise.
struct Args {
  DType dtype = DType::kFloat32;
  int64_t batch = 0, heads = 0, num_prefix = 0, h = 0, w = 0, head_dim = 0, value_dim = 0;
  int64_t mask_size = 3;
  bool hard = true;
  double scale = 1.0;
  View q, k, v;
  View out;          // forward: written, contiguous (B, N, heads, value_dim); backward: the saved output
  View grad_out;     // backward only
  void* lse = nullptr;        // (B, heads, N) in the accumulation type (float64 for float64, else float32)
  void* delta = nullptr;      // backward: (B, heads, N) accumulation type, grad_out . out per row
  void* value_sum = nullptr;  // forward (hard): sum of the grid values (kValueSum); backward (hard): the outside
                              // gradient of the grid values, computed; (B, heads, value_dim), accumulation type
  void* outside_prob = nullptr;  // backward (hard): (B, heads, N) accumulation type, exp(-lse_i) where query i
                                 // has non-neighbours, else 0
  View grad_q, grad_k;  // backward: written, (B, N, heads, head_dim) in the input dtype, e.g. views of one
  View grad_v;          // packed (B, N, 3, heads, d) gradient; grad_v is (B, N, heads, value_dim)
  // The global heads: q and out hold `queries` tokens, k and v `keys` tokens; each work item takes
  // `global_chunk` queries of one (b, head).
  int64_t queries = 0, keys = 0, global_chunk = 0;
};

// The stages of forward and backward. Each runs over a range of independent work items, so the
// op layer can split it between threads; no two items write the same memory. Items are numbered
// row-major in the order given, e.g. (b, grid position, head): consecutive items then read
// neighbouring memory of the token-major q, k, v, which the hardware prefetchers follow. The grid
// stages number (b, head, grid position) instead when most of their tensors are head planes. Grid
// positions are taken in vertical strips of a few columns (see MaskedKernel::Cursor).
enum class Stage : int {
  kForwardGrid = 1,      // items: (b, grid pos, head)  -> out, lse of the grid queries
  kForwardPrefix = 2,    // items: (b, head, prefix)    -> out, lse of the prefix queries
  kBackwardDelta = 3,    // items: (b, token, head)     -> delta, outside_prob
  kOutsideGrad = 4,      // items: (b, head)            -> value_sum = sum_i exp(-lse_i) grad_out_i (hard)
  kBackwardGrid = 5,     // items: (b, grid pos, head)  -> grad_q of the query, grad_k / grad_v of the key there
  kBackwardPrefixQuery = 6,  // items: (b, head, prefix) -> grad_q of the prefix queries
  kBackwardPrefixKey = 7,    // items: (b, head, prefix) -> grad_k / grad_v of the prefix keys
  kValueSum = 8,             // items: (b, head)            -> value_sum = sum of the grid values (hard)
  // The global heads (no mask): items (b, head, chunk of global_chunk queries) -> out and, where lse is
  // set, the log-sum-exp of each query's logits; the backward: items (b, head) -> grad_q, grad_k, grad_v.
  kGlobalForward = 9,
  kGlobalBackward = 10,
};

using KernelFn = void (*)(Stage stage, const Args& args, int64_t begin, int64_t end);

// One entry point per instruction set; a null pointer where the compiler could not build that variant.
KernelFn kernel_default();
KernelFn kernel_avx2();
KernelFn kernel_avx512();
KernelFn kernel_avx512_bf16();

// ---- What every op layer (torch's, OpenVINO's) shares: masked_attention_cpu_isa.cpp, torch-free ----

// The variants by number: 0 default, 1 AVX2, 2 AVX-512, 3 AVX-512 with the BF16 dot product.
KernelFn kernel_for(int isa);
// Whether this build has the variant and this CPU can run it.
bool isa_usable(int isa);
// The best usable variant, capped like torch's own kernels by the ATEN_CPU_CAPABILITY variable.
int best_isa();
// Work items per chunk of the grid stages: each item costs about mask_size^2 * d multiply-adds.
int64_t grid_grain(const Args& args);
// Head sizes the global heads' kernel (Stage::kGlobalForward) takes.
inline bool global_head_dim_supported(int64_t d) { return d == 32 || d == 64; }
// Queries per work item of the global heads: all of a (b, head) where that gives enough items to share
// between threads, else fewer, but at least 64 (each item packs its keys and values once).
int64_t global_chunk(int64_t batch_heads, int64_t queries);

// The forward pass as its stages in order: parallel(stage, items, grain) must run
// kernel(stage, args, begin, end) over the items [0, items) in chunks of about grain.
template <class Parallel>
void run_forward(const Args& args, Parallel&& parallel) {
  if (args.hard) parallel(Stage::kValueSum, args.batch * args.heads, int64_t(1));
  parallel(Stage::kForwardGrid, args.batch * args.heads * args.h * args.w, grid_grain(args));
  parallel(Stage::kForwardPrefix, args.batch * args.heads * args.num_prefix, int64_t(1));
}

}  // namespace hmait_cpu

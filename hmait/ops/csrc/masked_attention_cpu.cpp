// Hard and strict masked attention on CPU as torch custom ops (namespace hmait), forward and backward.
//
//   hmait::masked_attention_cpu_fwd(q, k, v, h, w, num_prefix, mask_size, hard, scale) -> (out, lse)
//   hmait::masked_attention_cpu_bwd(grad_out, q, k, v, out, lse, h, w, num_prefix, mask_size, hard, scale)
//       -> (grad_q, grad_k, grad_v)
//   hmait::masked_attention_cpu_qkv_fwd(qkv, h, w, num_prefix, mask_size, hard, scale) -> (out, lse)
//   hmait::masked_attention_cpu_qkv_bwd(grad_out, qkv, out, lse, h, w, num_prefix, mask_size, hard, scale)
//       -> grad_qkv
//
// Layout: q, k are (B, N, heads, d) and v is (B, N, heads, d_v), read through their strides (only the
// channel dimension must be contiguous, else it is made so), so they can be views of the qkv projection
// output (B, N, 3, heads, d). out is a new contiguous (B, N, heads, d_v) tensor in the dtype of q: viewed
// as (B, N, heads * d_v) it is what the output projection reads, without a copy. lse is (B, heads, N),
// float32 (float64 for float64 inputs). The gradients are new tensors laid out like the inputs where those
// are dense with a contiguous channel dimension, else contiguous.
// The qkv ops take the packed (B, N, 3, heads, d) projection instead and return its gradient in one piece.
//
// Work is split between threads with at::parallel_for (torch's own thread pool and thread count); the
// compute kernels live in one translation unit per instruction set, chosen at run time from the CPU.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <atomic>
#include <iterator>
#include <string>
#include <tuple>

#include "masked_attention_cpu_kernel.h"

namespace hmait_cpu {
namespace {

using at::Tensor;

// ---- instruction-set selection ----

constexpr const char* kIsaNames[] = {"default", "avx2", "avx512", "avx512_bf16"};

std::atomic<int>& current_isa() {
  static std::atomic<int> isa{best_isa()};
  return isa;
}

// Reports the instruction set in use; a non-empty request selects another ('best' for the default choice).
std::string select_isa(c10::string_view requested) {
  const std::string name(requested.data(), requested.size());
  if (name == "best") {
    current_isa() = best_isa();
  } else if (!name.empty()) {
    int isa = -1;
    for (int i = 0; i < int(std::size(kIsaNames)); ++i)
      if (name == kIsaNames[i]) isa = i;
    TORCH_CHECK(isa >= 0, "masked_attention_cpu_isa: requested must be '', 'best', 'default', 'avx2', 'avx512' or 'avx512_bf16', "
                "got '", name, "'");
    TORCH_CHECK(isa_usable(isa), "masked_attention_cpu_isa: '", name, "' is not available ",
                kernel_for(isa) == nullptr ? "in this build (compiler or architecture)" : "on this CPU");
    current_isa() = isa;
  }
  return kIsaNames[current_isa().load()];
}

// ---- argument checks ----

DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default:
      TORCH_CHECK(false, "masked_attention_cpu: q, k, v must be float32, float64, bfloat16 or float16, got ",
                  t.scalar_type());
  }
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The kernels read the channel dimension with unit stride; other strides are free.
Tensor channels_contiguous(const Tensor& t) { return t.size(3) <= 1 || t.stride(3) == 1 ? t : t.contiguous(); }

View view_of(const Tensor& t) {
  View view;
  view.data = t.data_ptr();
  view.stride_b = t.stride(0);
  view.stride_n = t.stride(1);
  view.stride_h = t.stride(2);
  return view;
}

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, int64_t h, int64_t w, int64_t num_prefix,
                  int64_t mask_size) {
  for (const auto& [name, t] : {std::pair<const char*, const Tensor&>{"q", q}, {"k", k}, {"v", v}}) {
    TORCH_CHECK(t.dim() == 4, "masked_attention_cpu: ", name, " must have shape (B, N, heads, d), got ", t.sizes());
    TORCH_CHECK(t.device().is_cpu(), "masked_attention_cpu: ", name, " must be a CPU tensor, got ", t.device());
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), "masked_attention_cpu: q, k, v must share a dtype, got ",
                q.scalar_type(), " and ", t.scalar_type(), " for ", name);
  }
  dtype_of(q);
  TORCH_CHECK(k.sizes() == q.sizes(), "masked_attention_cpu: k must have the shape of q ", q.sizes(), ", got ",
              k.sizes());
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == q.size(2),
              "masked_attention_cpu: v must share (B, N, heads) with q ", q.sizes(), ", got ", v.sizes());
  TORCH_CHECK(mask_size > 0 && mask_size % 2 == 1, "masked_attention_cpu: mask_size must be a positive odd integer, "
              "got ", mask_size);
  TORCH_CHECK(h > 0 && w > 0, "masked_attention_cpu: the grid (h, w) must be positive, got (", h, ", ", w, ")");
  TORCH_CHECK(num_prefix >= 0, "masked_attention_cpu: num_prefix must be >= 0, got ", num_prefix);
  TORCH_CHECK(q.size(1) == num_prefix + h * w, "masked_attention_cpu: the token count N=", q.size(1),
              " must equal num_prefix + h*w = ", num_prefix, " + ", h, "*", w);
}

Args make_args(const Tensor& q, const Tensor& k, const Tensor& v, int64_t h, int64_t w, int64_t num_prefix,
               int64_t mask_size, bool hard, double scale) {
  Args args;
  args.dtype = dtype_of(q);
  args.batch = q.size(0);
  args.heads = q.size(2);
  args.num_prefix = num_prefix;
  args.h = h;
  args.w = w;
  args.head_dim = q.size(3);
  args.value_dim = v.size(3);
  args.mask_size = mask_size;
  args.hard = hard;
  args.scale = scale;
  args.q = view_of(q);
  args.k = view_of(k);
  args.v = view_of(v);
  return args;
}

// Runs one stage over `items` independent work items, split between torch's threads.
void run_stage(KernelFn kernel, Stage stage, const Args& args, int64_t items, int64_t grain) {
  if (items <= 0) return;
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) { kernel(stage, args, begin, end); });
}

// ---- the ops ----

std::tuple<Tensor, Tensor> masked_attention_cpu_fwd(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                                    int64_t h, int64_t w, int64_t num_prefix, int64_t mask_size,
                                                    bool hard, double scale) {
  check_inputs(q_in, k_in, v_in, h, w, num_prefix, mask_size);
  const Tensor q = channels_contiguous(q_in), k = channels_contiguous(k_in), v = channels_contiguous(v_in);
  const int64_t batch = q.size(0), n = q.size(1), heads = q.size(2);
  const auto acc = q.options().dtype(acc_type(q.scalar_type()));
  Tensor out = at::empty({batch, n, heads, v.size(3)}, q.options());
  Tensor lse = at::empty({batch, heads, n}, acc);
  // Hard mode: the sum of the grid values, (B, heads, d_v), in the accumulation type.
  Tensor value_sum = at::empty({hard ? batch : 0, heads, v.size(3)}, acc);

  Args args = make_args(q, k, v, h, w, num_prefix, mask_size, hard, scale);
  args.out = view_of(out);
  args.lse = lse.data_ptr();
  args.value_sum = value_sum.data_ptr();
  const KernelFn kernel = kernel_for(current_isa().load());
  run_forward(args, [&](Stage stage, int64_t items, int64_t grain) { run_stage(kernel, stage, args, items, grain); });
  return {out, lse};
}

// The backward, written into grad_q, grad_k, grad_v: (B, N, heads, d) tensors shaped like q, k, v with a
// contiguous channel dimension, e.g. views of one packed gradient.
void backward_into(const Tensor& grad_out_in, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                   const Tensor& out_in, const Tensor& lse_in, int64_t h, int64_t w, int64_t num_prefix,
                   int64_t mask_size, bool hard, double scale, const Tensor& grad_q, const Tensor& grad_k,
                   const Tensor& grad_v) {
  check_inputs(q_in, k_in, v_in, h, w, num_prefix, mask_size);
  const Tensor q = channels_contiguous(q_in), k = channels_contiguous(k_in), v = channels_contiguous(v_in);
  const int64_t batch = q.size(0), n = q.size(1), heads = q.size(2);
  const auto value_shape = v.sizes();
  for (const auto& [name, t] : {std::pair<const char*, const Tensor&>{"grad_out", grad_out_in}, {"out", out_in}}) {
    TORCH_CHECK(t.sizes() == value_shape, "masked_attention_cpu_bwd: ", name, " must have shape ", value_shape,
                ", got ", t.sizes());
  }
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == batch && lse_in.size(1) == heads && lse_in.size(2) == n,
              "masked_attention_cpu_bwd: lse must have shape (", batch, ", ", heads, ", ", n, "), got ", lse_in.sizes());
  const auto acc_dtype = acc_type(q.scalar_type());
  const Tensor grad_out = channels_contiguous(grad_out_in.to(q.scalar_type()));
  const Tensor out = channels_contiguous(out_in.to(q.scalar_type()));
  const Tensor lse = lse_in.to(acc_dtype).contiguous();
  const auto acc = q.options().dtype(acc_dtype);
  Tensor delta = at::empty({batch, heads, n}, acc);
  Tensor outside_grad = at::empty({hard ? batch : 0, heads, v.size(3)}, acc);
  Tensor outside_prob = at::empty({hard ? batch : 0, heads, n}, acc);

  Args args = make_args(q, k, v, h, w, num_prefix, mask_size, hard, scale);
  args.out = view_of(out);
  args.grad_out = view_of(grad_out);
  args.lse = lse.data_ptr();
  args.delta = delta.data_ptr();
  args.value_sum = outside_grad.data_ptr();
  args.outside_prob = outside_prob.data_ptr();
  args.grad_q = view_of(grad_q);
  args.grad_k = view_of(grad_k);
  args.grad_v = view_of(grad_v);
  const KernelFn kernel = kernel_for(current_isa().load());
  run_stage(kernel, Stage::kBackwardDelta, args, batch * heads * n, 2048);
  if (hard) run_stage(kernel, Stage::kOutsideGrad, args, batch * heads, 1);
  run_stage(kernel, Stage::kBackwardGrid, args, batch * heads * h * w, std::max<int64_t>(1, grid_grain(args) / 4));
  run_stage(kernel, Stage::kBackwardPrefixQuery, args, batch * heads * num_prefix, 1);
  run_stage(kernel, Stage::kBackwardPrefixKey, args, batch * heads * num_prefix, 1);
}

// A new tensor laid out like t where t is dense with contiguous channels (e.g. (B, heads, N, d) head planes
// seen as (B, N, heads, d)), else contiguous: the layout the kernel writes fastest for such inputs.
Tensor gradient_like(const Tensor& t) {
  Tensor g = at::empty_like(t);
  return g.size(3) <= 1 || g.stride(3) == 1 ? g : at::empty(t.sizes(), t.options());
}

std::tuple<Tensor, Tensor, Tensor> masked_attention_cpu_bwd(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
    int64_t h, int64_t w, int64_t num_prefix, int64_t mask_size, bool hard, double scale) {
  Tensor grad_q = gradient_like(q), grad_k = gradient_like(k), grad_v = gradient_like(v);
  backward_into(grad_out, q, k, v, out, lse, h, w, num_prefix, mask_size, hard, scale, grad_q, grad_k, grad_v);
  return {grad_q, grad_k, grad_v};
}

// The packed layout of a qkv projection: qkv is (B, N, 3, heads, d) and q, k, v are its three slices.
void check_packed(const Tensor& qkv) {
  TORCH_CHECK(qkv.dim() == 5 && qkv.size(2) == 3, "masked_attention_cpu_qkv: qkv must have shape "
              "(B, N, 3, heads, d), got ", qkv.sizes());
}

std::tuple<Tensor, Tensor> masked_attention_cpu_qkv_fwd(const Tensor& qkv, int64_t h, int64_t w, int64_t num_prefix,
                                                        int64_t mask_size, bool hard, double scale) {
  check_packed(qkv);
  return masked_attention_cpu_fwd(qkv.select(2, 0), qkv.select(2, 1), qkv.select(2, 2), h, w, num_prefix,
                                  mask_size, hard, scale);
}

// The gradient of the packed qkv, written in place by the kernel: no per-tensor gradients to stack.
Tensor masked_attention_cpu_qkv_bwd(const Tensor& grad_out, const Tensor& qkv, const Tensor& out, const Tensor& lse,
                                    int64_t h, int64_t w, int64_t num_prefix, int64_t mask_size, bool hard,
                                    double scale) {
  check_packed(qkv);
  Tensor grad_qkv = at::empty(qkv.sizes(), qkv.options());
  backward_into(grad_out, qkv.select(2, 0), qkv.select(2, 1), qkv.select(2, 2), out, lse, h, w, num_prefix,
                mask_size, hard, scale, grad_qkv.select(2, 0), grad_qkv.select(2, 1), grad_qkv.select(2, 2));
  return grad_qkv;
}

// ---- the global heads ----

void check_global_inputs(const char* op, const Tensor& q, const Tensor& k, const Tensor& v) {
  for (const auto& [name, t] : {std::pair<const char*, const Tensor&>{"q", q}, {"k", k}, {"v", v}}) {
    TORCH_CHECK(t.dim() == 4, op, ": ", name, " must have shape (B, N, heads, d), got ", t.sizes());
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": q, k, v must share a dtype, got ", q.scalar_type(),
                " and ", t.scalar_type(), " for ", name);
  }
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              op, ": q, k, v must be float32, bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK(global_head_dim_supported(q.size(3)), op, ": the head size must be 32 or 64, got ", q.size(3));
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3), op,
              ": k must share (B, heads, d) with q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(k.size(1) > 0 || q.size(1) == 0, op, ": no keys for ", q.size(1), " queries");
}

Args global_args(const Tensor& q, const Tensor& k, const Tensor& v, double scale) {
  Args args;
  args.dtype = dtype_of(q);
  args.batch = q.size(0);
  args.heads = q.size(2);
  args.head_dim = q.size(3);
  args.value_dim = v.size(3);
  args.scale = scale;
  args.q = view_of(q);
  args.k = view_of(k);
  args.v = view_of(v);
  args.queries = q.size(1);
  args.keys = k.size(1);
  args.global_chunk = global_chunk(args.batch * args.heads, args.queries);
  return args;
}

// softmax(scale q k^T) v over every key: q (B, Nq, heads, d), k and v (B, Nk, heads, d), any strides with
// contiguous channels -> a new contiguous (B, Nq, heads, d) output and the float32 log-sum-exp of each
// query's logits, (B, heads, Nq), which the backward reads.
std::tuple<Tensor, Tensor> global_attention_cpu_fwd(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                                    double scale) {
  check_global_inputs("global_attention_cpu_fwd", q_in, k_in, v_in);
  const Tensor q = channels_contiguous(q_in), k = channels_contiguous(k_in), v = channels_contiguous(v_in);
  Tensor out = at::empty(q.sizes(), q.options());
  Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  Args args = global_args(q, k, v, scale);
  args.out = view_of(out);
  args.lse = lse.data_ptr();
  if (args.queries == 0) return {out, lse};
  const int64_t chunks = (args.queries + args.global_chunk - 1) / args.global_chunk;
  run_stage(kernel_for(current_isa().load()), Stage::kGlobalForward, args, args.batch * args.heads * chunks, 1);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> global_attention_cpu_bwd(const Tensor& grad_out_in, const Tensor& q_in,
                                                            const Tensor& k_in, const Tensor& v_in,
                                                            const Tensor& out_in, const Tensor& lse_in,
                                                            double scale) {
  check_global_inputs("global_attention_cpu_bwd", q_in, k_in, v_in);
  for (const auto& [name, t] : {std::pair<const char*, const Tensor&>{"grad_out", grad_out_in}, {"out", out_in}}) {
    TORCH_CHECK(t.sizes() == q_in.sizes(), "global_attention_cpu_bwd: ", name, " must have the shape of q ",
                q_in.sizes(), ", got ", t.sizes());
  }
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == q_in.size(0) && lse_in.size(1) == q_in.size(2) &&
              lse_in.size(2) == q_in.size(1), "global_attention_cpu_bwd: lse must have shape (B, heads, Nq), got ",
              lse_in.sizes());
  const Tensor q = channels_contiguous(q_in), k = channels_contiguous(k_in), v = channels_contiguous(v_in);
  const Tensor grad_out = channels_contiguous(grad_out_in.to(q.scalar_type()));
  const Tensor out = channels_contiguous(out_in.to(q.scalar_type()));
  const Tensor lse = lse_in.to(at::kFloat).contiguous();
  Tensor grad_q = at::empty(q.sizes(), q.options()), grad_k = at::empty(k.sizes(), k.options()),
         grad_v = at::empty(v.sizes(), v.options());
  Args args = global_args(q, k, v, scale);
  args.out = view_of(out);
  args.grad_out = view_of(grad_out);
  args.lse = const_cast<void*>(lse.data_ptr());
  args.grad_q = view_of(grad_q);
  args.grad_k = view_of(grad_k);
  args.grad_v = view_of(grad_v);
  if (args.queries == 0) {
    grad_k.zero_();
    grad_v.zero_();
    return {grad_q, grad_k, grad_v};
  }
  run_stage(kernel_for(current_isa().load()), Stage::kGlobalBackward, args, args.batch * args.heads, 1);
  return {grad_q, grad_k, grad_v};
}

}  // namespace
}  // namespace hmait_cpu

// A fragment, not a definition: other parts of hmait register ops in the same namespace from Python.
TORCH_LIBRARY_FRAGMENT(hmait, m) {
  m.def("masked_attention_cpu_fwd(Tensor q, Tensor k, Tensor v, SymInt h, SymInt w, int num_prefix, int mask_size, "
        "bool hard, float scale) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  m.def("masked_attention_cpu_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, SymInt h, "
        "SymInt w, int num_prefix, int mask_size, bool hard, float scale) -> (Tensor, Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  m.def("masked_attention_cpu_qkv_fwd(Tensor qkv, SymInt h, SymInt w, int num_prefix, int mask_size, bool hard, "
        "float scale) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  m.def("masked_attention_cpu_qkv_bwd(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, SymInt h, SymInt w, "
        "int num_prefix, int mask_size, bool hard, float scale) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("global_attention_cpu_fwd(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  m.def("global_attention_cpu_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "float scale) -> (Tensor, Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  m.def("masked_attention_cpu_isa(str requested='') -> str", &hmait_cpu::select_isa);
}

TORCH_LIBRARY_IMPL(hmait, CPU, m) {
  m.impl("masked_attention_cpu_fwd", &hmait_cpu::masked_attention_cpu_fwd);
  m.impl("masked_attention_cpu_bwd", &hmait_cpu::masked_attention_cpu_bwd);
  m.impl("masked_attention_cpu_qkv_fwd", &hmait_cpu::masked_attention_cpu_qkv_fwd);
  m.impl("masked_attention_cpu_qkv_bwd", &hmait_cpu::masked_attention_cpu_qkv_bwd);
  m.impl("global_attention_cpu_fwd", &hmait_cpu::global_attention_cpu_fwd);
  m.impl("global_attention_cpu_bwd", &hmait_cpu::global_attention_cpu_bwd);
}

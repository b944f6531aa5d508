// The masked heads as an OpenVINO operation: type MaskedAttention in the domain hmait, for exported
// graphs that carry the project's CPU kernel instead of the standard-operator 'halo' formulation.
//
//   inputs:  qkv  (B, N, 3, heads, d): the packed projection, f32, bf16 or f16
//            grid (2,) int64 or int32: the token grid (h, w), with N = num_prefix_tokens + h * w
//   output:  (B, N, heads, d) in the type of qkv
//   attributes: mask_size (odd), mode ('hard' or 'strict'), num_prefix_tokens, scale
//
// Semantics are those of hmait.ops.masked_attention (the paper's Eq. 2 for 'hard'). The ONNX frontend
// maps a node of the same type, domain and attribute names to it. Work is split with oneTBB, which
// OpenVINO's CPU plugin also runs on, so the operation keeps to the threads the compiled model has.
#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/frontend/onnx/extension/op.hpp>
#include <openvino/op/op.hpp>
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "masked_attention_cpu_kernel.h"

namespace hmait_openvino {

class MaskedAttention : public ov::op::Op {
 public:
  OPENVINO_OP("MaskedAttention", "hmait");

  MaskedAttention() = default;
  MaskedAttention(const ov::Output<ov::Node>& qkv, const ov::Output<ov::Node>& grid, int64_t mask_size,
                  const std::string& mode, int64_t num_prefix_tokens, float scale)
      : Op({qkv, grid}), mask_size_(mask_size), mode_(mode), num_prefix_tokens_(num_prefix_tokens), scale_(scale) {
    constructor_validate_and_infer_types();
  }

  void validate_and_infer_types() override {
    NODE_VALIDATION_CHECK(this, get_input_size() == 2, "MaskedAttention takes 2 inputs (qkv, grid), got ",
                          get_input_size());
    const auto type = get_input_element_type(0);
    NODE_VALIDATION_CHECK(this, type.is_dynamic() || type == ov::element::f32 || type == ov::element::bf16 ||
                          type == ov::element::f16, "qkv must be f32, bf16 or f16, got ", type);
    const auto grid_type = get_input_element_type(1);
    NODE_VALIDATION_CHECK(this, grid_type.is_dynamic() || grid_type == ov::element::i64 ||
                          grid_type == ov::element::i32, "grid must be i64 or i32, got ", grid_type);
    NODE_VALIDATION_CHECK(this, mask_size_ > 0 && mask_size_ % 2 == 1, "mask_size must be a positive odd integer, got ",
                          mask_size_);
    NODE_VALIDATION_CHECK(this, mode_ == "hard" || mode_ == "strict", "mode must be 'hard' or 'strict', got '", mode_,
                          "'");
    NODE_VALIDATION_CHECK(this, num_prefix_tokens_ >= 0, "num_prefix_tokens must be >= 0, got ", num_prefix_tokens_);
    const auto& shape = get_input_partial_shape(0);
    ov::PartialShape out = ov::PartialShape::dynamic(4);
    if (shape.rank().is_static()) {
      NODE_VALIDATION_CHECK(this, shape.rank().get_length() == 5 && shape[2].compatible(3),
                            "qkv must have shape (B, N, 3, heads, d), got ", shape);
      out = ov::PartialShape{shape[0], shape[1], shape[3], shape[4]};
    }
    set_output_type(0, type, out);
  }

  std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& inputs) const override {
    OPENVINO_ASSERT(inputs.size() == 2, "MaskedAttention takes 2 inputs (qkv, grid), got ", inputs.size());
    return std::make_shared<MaskedAttention>(inputs[0], inputs[1], mask_size_, mode_, num_prefix_tokens_, scale_);
  }

  bool visit_attributes(ov::AttributeVisitor& visitor) override {
    visitor.on_attribute("mask_size", mask_size_);
    visitor.on_attribute("mode", mode_);
    visitor.on_attribute("num_prefix_tokens", num_prefix_tokens_);
    visitor.on_attribute("scale", scale_);
    return true;
  }

  bool has_evaluate() const override { return true; }

  bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override {
    const ov::Tensor& qkv = inputs[0];
    const ov::Tensor& grid = inputs[1];
    const ov::Shape shape = qkv.get_shape();
    OPENVINO_ASSERT(shape.size() == 5 && shape[2] == 3, "MaskedAttention: qkv must have shape (B, N, 3, heads, d), got ",
                    shape);
    OPENVINO_ASSERT(grid.get_size() == 2, "MaskedAttention: grid must hold (h, w), got ", grid.get_size(), " values");
    int64_t h, w;
    if (grid.get_element_type() == ov::element::i64) {
      h = grid.data<const int64_t>()[0];
      w = grid.data<const int64_t>()[1];
    } else {
      h = grid.data<const int32_t>()[0];
      w = grid.data<const int32_t>()[1];
    }
    const int64_t batch = shape[0], n = shape[1], heads = shape[3], d = shape[4];
    OPENVINO_ASSERT(h > 0 && w > 0 && n == num_prefix_tokens_ + h * w, "MaskedAttention: the token count N=", n,
                    " must equal num_prefix_tokens + h*w = ", num_prefix_tokens_, " + ", h, "*", w);

    hmait_cpu::Args args;
    const auto type = qkv.get_element_type();
    args.dtype = type == ov::element::f32    ? hmait_cpu::DType::kFloat32
                 : type == ov::element::bf16 ? hmait_cpu::DType::kBFloat16
                                             : hmait_cpu::DType::kFloat16;
    args.batch = batch;
    args.heads = heads;
    args.num_prefix = num_prefix_tokens_;
    args.h = h;
    args.w = w;
    args.head_dim = d;
    args.value_dim = d;
    args.mask_size = mask_size_;
    args.hard = mode_ == "hard";
    args.scale = scale_;
    // q, k and v are the three slices of the dense qkv: (B, N, heads, d) views with the strides of (B, N, 3, heads, d).
    const char* base = static_cast<const char*>(qkv.data());
    const size_t slice_bytes = size_t(heads * d) * type.size();
    for (int i = 0; i < 3; ++i) {
      hmait_cpu::View& view = i == 0 ? args.q : i == 1 ? args.k : args.v;
      view.data = base + i * slice_bytes;
      view.stride_b = n * 3 * heads * d;
      view.stride_n = 3 * heads * d;
      view.stride_h = d;
    }
    ov::Tensor& out = outputs[0];
    out.set_shape({shape[0], shape[1], shape[3], shape[4]});
    args.out.data = out.data();
    args.out.stride_b = n * heads * d;
    args.out.stride_n = heads * d;
    args.out.stride_h = d;
    std::vector<float> lse(size_t(batch * heads * n));
    std::vector<float> value_sum(args.hard ? size_t(batch * heads * d) : 0);
    args.lse = lse.data();
    args.value_sum = value_sum.data();

    // Chosen once per process, as the torch op does: the CPU and ATEN_CPU_CAPABILITY do not change.
    static const hmait_cpu::KernelFn kernel = hmait_cpu::kernel_for(hmait_cpu::best_isa());
    hmait_cpu::run_forward(args, [&](hmait_cpu::Stage stage, int64_t items, int64_t grain) {
      if (items <= 0) return;
      tbb::parallel_for(tbb::blocked_range<int64_t>(0, items, grain), [&](const tbb::blocked_range<int64_t>& range) {
        kernel(stage, args, range.begin(), range.end());
      });
    });
    return true;
  }

 private:
  int64_t mask_size_ = 3;
  std::string mode_ = "hard";
  int64_t num_prefix_tokens_ = 0;
  float scale_ = 1.f;
};

}  // namespace hmait_openvino

OPENVINO_CREATE_EXTENSIONS(std::vector<ov::Extension::Ptr>({
    std::make_shared<ov::OpExtension<hmait_openvino::MaskedAttention>>(),
    std::make_shared<ov::frontend::onnx::OpExtension<hmait_openvino::MaskedAttention>>("MaskedAttention", "hmait"),
}));

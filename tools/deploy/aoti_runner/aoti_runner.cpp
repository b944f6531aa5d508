// Runs an AOTInductor package of H-MaiT or MaiT (tools/deploy/export_aoti.py) from C++, without Python.
//
//   aoti_runner KERNEL_LIBRARY PACKAGE.pt2 INPUT OUTPUT_PREFIX B C H W
//
// KERNEL_LIBRARY is the project's CPU kernel (hmait_masked_attention_cpu.so, built by `make setup`;
// `python -c "from hmait.ops import cpu_kernel; print(cpu_kernel.library_path())"` prints its path). The
// package calls the kernel's op through torch's dispatcher, so the library is loaded first: it registers
// the op when loaded. INPUT holds B*C*H*W float32 values (row-major B, C, H, W); each output i of the
// package is written as raw float32 to OUTPUT_PREFIX<i>.bin and its shape printed on a line of its own.
// B C H W must be a shape the package takes (export_aoti.py records it in the package: the fixed shape,
// or for a --dynamic package any batch, and heights and widths that are multiples of 32).
#include <ATen/ATen.h>
#include <dlfcn.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

// Empty if the package (its metadata from export_aoti.py) takes `shape`, else what it takes instead.
std::string unaccepted(const std::unordered_map<std::string, std::string>& metadata,
                       const std::vector<int64_t>& shape) {
  const auto spec = metadata.find("hmait.input");
  if (spec == metadata.end()) {
    return "";  // not recorded: a package from elsewhere
  }
  const auto multiple_entry = metadata.find("hmait.side_multiple");
  const int64_t multiple = multiple_entry == metadata.end() ? 1 : std::stoll(multiple_entry->second);
  std::vector<std::string> expected;
  std::stringstream parts(spec->second);
  for (std::string part; std::getline(parts, part, 'x');) {
    expected.push_back(part);
  }
  bool fits = expected.size() == shape.size();
  for (size_t i = 0; fits && i < shape.size(); ++i) {
    fits = (expected[i] == "?" || std::stoll(expected[i]) == shape[i]) && (i < 2 || shape[i] % multiple == 0);
  }
  if (fits) {
    return "";
  }
  return spec->second + (multiple > 1 ? " (? any batch; H and W multiples of " + std::to_string(multiple) + ")" : "");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 9) {
    std::cerr << "usage: " << argv[0] << " KERNEL_LIBRARY PACKAGE.pt2 INPUT OUTPUT_PREFIX B C H W\n";
    return 2;
  }
  if (dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    std::cerr << "aoti_runner: error: cannot load the kernel library " << argv[1] << ": " << dlerror() << "\n";
    return 2;
  }
  std::vector<int64_t> shape;
  for (int i = 5; i < 9; ++i) {
    char* end = nullptr;
    const long long value = std::strtoll(argv[i], &end, 10);
    if (*end != '\0' || value <= 0) {
      std::cerr << "aoti_runner: error: B C H W must be positive integers, got '" << argv[i] << "'\n";
      return 2;
    }
    shape.push_back(value);
  }
  at::Tensor input = at::empty(shape, at::kFloat);
  std::ifstream in(argv[3], std::ios::binary);
  in.read(static_cast<char*>(input.data_ptr()), static_cast<std::streamsize>(input.nbytes()));
  if (!in || in.peek() != std::char_traits<char>::eof()) {
    std::cerr << "aoti_runner: error: " << argv[3] << " must hold exactly " << input.numel()
              << " float32 values (B*C*H*W)\n";
    return 2;
  }
  try {
    torch::inductor::AOTIModelPackageLoader loader(argv[2]);
    const std::string accepted = unaccepted(loader.get_metadata(), shape);
    if (!accepted.empty()) {
      std::cerr << "aoti_runner: error: B C H W = " << argv[5] << " " << argv[6] << " " << argv[7] << " " << argv[8]
                << " is not a shape the package takes: " << accepted << "\n";
      return 2;
    }
    const std::vector<at::Tensor> outputs = loader.run({input});
    for (size_t i = 0; i < outputs.size(); ++i) {
      const at::Tensor out = outputs[i].contiguous().to(at::kFloat);
      const std::string path = std::string(argv[4]) + std::to_string(i) + ".bin";
      std::ofstream file(path, std::ios::binary);
      file.write(static_cast<const char*>(out.data_ptr()), static_cast<std::streamsize>(out.nbytes()));
      std::cout << "output " << i << " " << out.sizes() << "\n";
    }
  } catch (const std::exception& err) {
    std::cerr << "aoti_runner: error: " << err.what() << "\n";
    return 1;
  }
  return 0;
}

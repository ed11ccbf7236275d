// The native Metal backend (affine_mps.mm, compiled on macOS with an MPS-enabled torch only; the
// build defines MLXQ_WITH_MPS then). Python (mlxq.metal.backend) decides whether it is used:
// it loads the prebuilt metallib and, on success, registers these kernels for the MPS key.
#pragma once

#include <string>
#include <vector>

namespace mlxq::mps::native {

// Loads the metallib at `path` (once; later calls with another path replace it and clear the
// pipeline cache). Returns "" on success, else the Metal error text; never throws or prints.
std::string load_library(const std::string& path);

// Path of the loaded metallib ("" when none).
std::string library_path();

// Kernel (function) names in the loaded metallib.
std::vector<std::string> function_names();

// Registers affine_quantize / affine_dequantize / affine_matmul for the MPS dispatch key
// (once; the library must be loaded first).
void register_kernels();
bool kernels_registered();

}  // namespace mlxq::mps::native

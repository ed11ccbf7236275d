// Native Metal kernels of the mlxq ops for the MPS dispatch key. Every decision (kernel, grid,
// bindings, threadgroup memory, params bytes, operand layout, outputs) is made by the shared,
// tested launch (metal_host/launch.h over metal_host/dispatch_plan.h); this file only loads the
// prebuilt metallib, caches one pipeline per kernel name, and encodes a launch on PyTorch's current
// MPS stream: no extra synchronisation and no host round trip, so the kernels queue up with the
// surrounding torch ops in stream order.
// Written without ARC or manual release: the library and the pipelines are created once (`new*`
// returns them retained) and live for the process, which is correct under ARC and MRC alike.
#include <ATen/mps/MPSDevice.h>
#include <ATen/mps/MPSStream.h>
#include <torch/library.h>

#include <array>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "metal_host/launch.h"
#include "mps/native.h"

namespace mlxq::mps::native {
namespace {

// The portable host side (csrc/metal_host/): what to launch and how to encode it.
using metal::check_launch;
using metal::encode_launch;
using metal::Encoder;
using metal::Launch;
using metal::PipelineLimits;

std::mutex g_mutex;              // guards everything below
id<MTLLibrary> g_library = nil;  // the loaded metallib
std::string g_library_path;      // its path
std::unordered_map<std::string, id<MTLComputePipelineState>> g_pipelines;
std::unique_ptr<torch::Library> g_impl;  // the MPS registrations, alive for the process

std::string describe(NSError* error) {
  if (error == nil) return "unknown error";
  const char* text = [[error localizedDescription] UTF8String];
  return text != nullptr ? std::string(text) : std::string("unknown error");
}

// The pipeline of `kernel`, created on first use. Throws a clear error when the kernel is not in
// the library (a stale metallib) or Metal rejects it.
id<MTLComputePipelineState> pipeline(const std::string& kernel) {
  std::lock_guard<std::mutex> lock(g_mutex);
  TORCH_CHECK(g_library != nil,
              "mlxq: the prebuilt Metal library is not loaded (mlxq.metal.backend loads it on "
              "import; see `mlxq doctor`)");
  auto it = g_pipelines.find(kernel);
  if (it != g_pipelines.end()) return it->second;
  id<MTLComputePipelineState> pso = nil;
  std::string error;
  @autoreleasepool {
    NSString* name = [NSString stringWithUTF8String:kernel.c_str()];
    id<MTLFunction> fn = [g_library newFunctionWithName:name];
    if (fn == nil) {
      error = "kernel " + kernel + " is not in " + g_library_path +
              " (a stale or partial build: rebuild mlxq, or set MLXQ_METAL=runtime)";
    } else {
      NSError* err = nil;
      pso = [[g_library device] newComputePipelineStateWithFunction:fn error:&err];
      if (pso == nil)
        error = "Metal could not create the pipeline of " + kernel + ": " + describe(err);
    }
  }
  TORCH_CHECK(pso != nil, "mlxq: ", error);
  g_pipelines.emplace(kernel, pso);
  return pso;
}

// Metal's side of encode_launch (metal_host/launch.h): one encoder call each.
class MetalEncoder final : public Encoder {
 public:
  explicit MetalEncoder(id<MTLComputeCommandEncoder> enc) : enc_(enc) {}
  void set_buffer(int index, const at::Tensor& t, int64_t offset_bytes) override {
    // An MPS storage's data pointer is its MTLBuffer (PyTorch's getMTLBufferStorage).
    id<MTLBuffer> buf = __builtin_bit_cast(id<MTLBuffer>, t.storage().data());
    [enc_ setBuffer:buf
             offset:static_cast<NSUInteger>(offset_bytes)
            atIndex:static_cast<NSUInteger>(index)];
  }
  void set_bytes(int index, const std::vector<uint8_t>& bytes) override {
    [enc_ setBytes:bytes.data() length:bytes.size() atIndex:static_cast<NSUInteger>(index)];
  }
  void set_threadgroup_memory(int index, int64_t bytes) override {
    [enc_ setThreadgroupMemoryLength:static_cast<NSUInteger>(bytes)
                             atIndex:static_cast<NSUInteger>(index)];
  }
  void dispatch_threadgroups(const std::array<uint32_t, 3>& grid,
                             const std::array<uint32_t, 3>& threads) override {
    [enc_ dispatchThreadgroups:MTLSizeMake(grid[0], grid[1], grid[2])
         threadsPerThreadgroup:MTLSizeMake(threads[0], threads[1], threads[2])];
  }

 private:
  id<MTLComputeCommandEncoder> enc_;
};

// Encodes `l` on the current MPS stream's compute encoder, in stream order.
void encode(const Launch& l) {
  if (l.empty()) return;
  id<MTLComputePipelineState> pso = pipeline(l.plan.kernel);
  PipelineLimits limits;
  limits.max_threads_per_threadgroup = [pso maxTotalThreadsPerThreadgroup];
  limits.static_threadgroup_bytes = static_cast<int64_t>([pso staticThreadgroupMemoryLength]);
  limits.max_threadgroup_bytes = static_cast<int64_t>([[pso device] maxThreadgroupMemoryLength]);
  check_launch(l, limits, c10::DeviceType::MPS);

  at::mps::MPSStream* stream = at::mps::getCurrentMPSStream();
  const Launch* lp = &l;  // dispatch_sync runs the block before returning
  __block std::exception_ptr failure;
  dispatch_sync(stream->queue(), ^() {
    @autoreleasepool {
      try {
        id<MTLComputeCommandEncoder> enc = stream->commandEncoder();
        TORCH_CHECK(enc != nil, "mlxq: the MPS stream has no compute command encoder");
        [enc setComputePipelineState:pso];
        MetalEncoder metal(enc);
        encode_launch(*lp, metal);
      } catch (...) {
        failure = std::current_exception();  // exceptions must not cross libdispatch
      }
    }
  });
  if (failure) std::rethrow_exception(failure);
}

at::Tensor affine_matmul_mps(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                             const at::Tensor& biases, int64_t group_size, int64_t bits,
                             bool transpose) {
  Launch l = metal::launch_affine_matmul(x, wq, scales, biases, group_size, bits, transpose);
  encode(l);
  return l.outputs[0];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_quantize_mps(const at::Tensor& w,
                                                                   int64_t group_size,
                                                                   int64_t bits) {
  Launch l = metal::launch_affine_quantize(w, group_size, bits);
  encode(l);
  return {l.outputs[0], l.outputs[1], l.outputs[2]};
}

at::Tensor affine_dequantize_mps(const at::Tensor& wq, const at::Tensor& scales,
                                 const at::Tensor& biases, int64_t group_size, int64_t bits) {
  Launch l = metal::launch_affine_dequantize(wq, scales, biases, group_size, bits);
  encode(l);
  return l.outputs[0];
}

at::Tensor affine_gather_matmul_mps(const at::Tensor& x, const at::Tensor& wq,
                                    const at::Tensor& scales, const at::Tensor& biases,
                                    const std::optional<at::Tensor>& lhs_indices,
                                    const std::optional<at::Tensor>& rhs_indices,
                                    int64_t group_size, int64_t bits, bool transpose,
                                    bool sorted_indices) {
  // sorted_indices may pick the sorted gather qmm; results do not depend on it
  Launch l = metal::launch_affine_gather_matmul(x, wq, scales, biases, lhs_indices, rhs_indices,
                                                group_size, bits, transpose, sorted_indices);
  encode(l);
  return l.outputs[0];
}

std::tuple<at::Tensor, at::Tensor> fp_quantize_mps(const at::Tensor& w, c10::string_view mode,
                                                   int64_t group_size, int64_t bits,
                                                   const std::optional<at::Tensor>& global_scale) {
  Launch l = metal::launch_fp_quantize(w, mode, group_size, bits, global_scale);
  encode(l);
  return {l.outputs[0], l.outputs[1]};
}

at::Tensor fp_dequantize_mps(const at::Tensor& wq, const at::Tensor& scales, c10::string_view mode,
                             int64_t group_size, int64_t bits,
                             const std::optional<at::Tensor>& global_scale,
                             std::optional<at::ScalarType> dtype) {
  Launch l = metal::launch_fp_dequantize(wq, scales, mode, group_size, bits, global_scale, dtype);
  encode(l);
  return l.outputs[0];
}

at::Tensor fp_matmul_mps(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                         c10::string_view mode, int64_t group_size, int64_t bits, bool transpose,
                         const std::optional<at::Tensor>& global_scale) {
  Launch l =
      metal::launch_fp_matmul(x, wq, scales, global_scale, mode, group_size, bits, transpose);
  encode(l);
  return l.outputs[0];
}

at::Tensor fp_gather_matmul_mps(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                                c10::string_view mode, int64_t group_size, int64_t bits,
                                const std::optional<at::Tensor>& lhs_indices,
                                const std::optional<at::Tensor>& rhs_indices, bool transpose,
                                const std::optional<at::Tensor>& global_scale,
                                bool sorted_indices) {
  // sorted_indices may pick the sorted gather qmm; results do not depend on it
  Launch l = metal::launch_fp_gather_matmul(x, wq, scales, mode, group_size, bits, lhs_indices,
                                            rhs_indices, transpose, global_scale, sorted_indices);
  encode(l);
  return l.outputs[0];
}

}  // namespace

std::string load_library(const std::string& path) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_library != nil && g_library_path == path) return "";
  std::string error;
  @autoreleasepool {
    id<MTLDevice> device = at::mps::MPSDevice::getInstance()->device();
    if (device == nil) return "no Metal device";
    NSURL* url = [NSURL fileURLWithPath:[NSString stringWithUTF8String:path.c_str()]];
    NSError* err = nil;
    id<MTLLibrary> lib = [device newLibraryWithURL:url error:&err];
    if (lib == nil) {
      error = describe(err);
    } else {
      g_library = lib;  // a replaced library is leaked on purpose: pipelines may still use it
      g_library_path = path;
      g_pipelines.clear();
    }
  }
  return error;
}

std::string library_path() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_library_path;
}

std::vector<std::string> function_names() {
  std::lock_guard<std::mutex> lock(g_mutex);
  std::vector<std::string> names;
  if (g_library == nil) return names;
  @autoreleasepool {
    for (NSString* n in [g_library functionNames]) names.emplace_back([n UTF8String]);
  }
  return names;
}

void register_kernels() {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_impl) return;
  TORCH_CHECK(g_library != nil, "mlxq: load the metallib before registering the Metal kernels");
  g_impl = std::make_unique<torch::Library>(torch::Library::IMPL, "mlxq", c10::DispatchKey::MPS,
                                            __FILE__, __LINE__);
  g_impl->impl("affine_quantize", TORCH_FN(affine_quantize_mps));
  g_impl->impl("affine_dequantize", TORCH_FN(affine_dequantize_mps));
  g_impl->impl("affine_matmul", TORCH_FN(affine_matmul_mps));
  g_impl->impl("fp_matmul", TORCH_FN(fp_matmul_mps));
  g_impl->impl("fp_dequantize", TORCH_FN(fp_dequantize_mps));
  g_impl->impl("fp_quantize", TORCH_FN(fp_quantize_mps));
  g_impl->impl("affine_gather_matmul", TORCH_FN(affine_gather_matmul_mps));
  g_impl->impl("fp_gather_matmul", TORCH_FN(fp_gather_matmul_mps));
}

bool kernels_registered() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return static_cast<bool>(g_impl);
}

}  // namespace mlxq::mps::native

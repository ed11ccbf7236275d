// The kernels for the baseline instruction set of the build target (NEON on arm64).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "cpu/kernel_table.h"

#define MLXQ_ISA portable
#include "cpu/kernels.h"

namespace mlxq::cpu {
const KernelTable& portable_kernels() { return portable::table("portable"); }
}  // namespace mlxq::cpu

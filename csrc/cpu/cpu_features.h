// Run-time choice of the instruction set for the CPU kernels: the fastest one this CPU has
// among those compiled in, so an older CPU never meets an illegal instruction.
#pragma once

#include <string>

namespace mlxq::cpu {

enum class Isa { kPortable, kAvx2, kAvx512 };

// The ISA the kernels run with; MLXQ_CPU_ISA=portable|avx2 caps it (for tests, benchmarks).
Isa active_isa_enum();
std::string active_isa();

// Whether at::parallel_for runs on torch's intra-op threads in this build (with torch's OpenMP
// backend it needs -fopenmp, see openmp_flags in python/mlxq/_build_helpers.py).
bool threaded();

// Forces "portable", "avx2", "avx512" or back to "auto" (for tests and benchmarks).
void set_isa(const std::string& name);

}  // namespace mlxq::cpu

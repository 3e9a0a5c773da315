// CPU kernel of attnmem::cross_attention: what the rest of the extension needs to know.
#pragma once

#include <string>

#include "../checks.h"

namespace attnmem::cpu {

// True when the build contains the x86-64 SIMD paths (AVX2/FMA and AVX-512, chosen at run time,
// never by -march flags), and the path this machine uses now ("avx512", "avx2" or "generic";
// ATTNMEM_CPU_ISA=generic|avx2 caps it).
bool simd_compiled();
std::string simd_runtime();

}  // namespace attnmem::cpu

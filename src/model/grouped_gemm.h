// Which kernel runs the routed experts of an MoE layer (model/moe.cpp):
//
//   loop     one host copy of the E group sizes per layer, then 3 plain mm per
//            non-empty expert group (fwd) on zero-copy slices. Any LibTorch, any
//            device, any dtype.
//   grouped  at::_grouped_mm (LibTorch >= 2.8): 2 grouped GEMMs per layer over
//            all experts (w1|w3 as one [E, D, 2H] weight, then w2; the gated
//            activation between them is one node), the group boundaries given
//            as device-side int32 offsets (cumsum of the counts), so no host sync
//            and no per-expert launches. Inputs and weights are cast to bf16 (the CUTLASS kernel
//            runs on sm90/sm100 in bf16 only; elsewhere ATen falls back to a
//            per-group loop with its own host copy). Needs d_model and
//            expert_hidden to be multiples of 8 (16-byte rows).
//   auto     grouped on CUDA when the layer runs in bf16 (autocast or bf16
//            inputs) and the build has _grouped_mm; loop otherwise. The default.
//
// The mode comes from MOECPT_EXPERT_GEMM (auto | grouped | loop) when first
// asked, or from set_expert_gemm_mode() (`moecpt bench` uses it to run both).
#pragma once
#include <cstdint>
#include <string>

namespace moecpt::model {

enum class ExpertGemm { kAuto, kGrouped, kLoop };

ExpertGemm expert_gemm_mode();
void set_expert_gemm_mode(ExpertGemm mode);
// "auto" | "grouped" | "loop"; parse throws moecpt::Error naming the bad value.
ExpertGemm parse_expert_gemm(const std::string& name);
const char* expert_gemm_name(ExpertGemm mode);
// Whether this build's LibTorch has at::_grouped_mm (>= 2.8).
bool grouped_mm_compiled();

// How many expert-FFN forward calls took each path since the process started
// (to report which path a benchmark actually measured).
struct ExpertGemmCalls {
  int64_t grouped = 0, loop = 0;
};
ExpertGemmCalls expert_gemm_calls();

}  // namespace moecpt::model

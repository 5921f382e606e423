// From the attention's fused projection output to the rotated q, k and v, as
// one autograd Function. With n = rotary half (Dh/2), x = [x1 | x2] a head's
// q or k vector at position t, c = cos(t θ_i), s = sin(t θ_i):
//
//   forward   y1 = x1 c − x2 s,      y2 = x2 c + x1 s
//   backward  dx1 = dy1 c + dy2 s,   dx2 = dy2 c − dy1 s      (R_tᵀ dy)
//
// Forward: two multiplies and two fused multiply-adds per tensor, written into
// q and k (layout below); v is a view of the input. Backward
// writes dq, dk and dv straight into one [B, T, 3, H, Dh] buffer, the input's
// layout. The same maths as autograd over split/narrow/cat (apply_rotary)
// costs, per layer, three zero-filled copies of the whole qkv gradient
// (select's backward) and their sums, two more per rotated tensor (narrow's
// backward), the cat and a reshape copy; the H100 profile of docs/performance.md
// put those at ~35 ms of a 206 ms dense step.
#pragma once
#include "model/attention.h"

namespace moecpt::model {

struct RotatedQKV {
  torch::Tensor q, k, v;  // [B, H, T, Dh]
};

// Where q and k live in memory; their shape is [B, H, T, Dh] either way.
// kHeadMajor: contiguous [B, H, T, Dh]. kSeqMajor: a transposed view of a
// contiguous [B, T, H, Dh] (the "BSHD" layout of flash and cuDNN attention).
// cuDNN's SDPA (LibTorch 2.x) allocates its output in q's layout and brings
// the output's gradient into that layout; with seq-major q the output's
// [B, T, H·Dh] view for the out-projection and its gradient need no copy,
// where head-major costs a clone forward and a copy backward per layer.
enum class QKVLayout { kHeadMajor, kSeqMajor };

// qkv_BTC: [B, T, 3·H·Dh], the projection's output (q, k, v stacked, heads
// inside each); rope tables [T, Dh/2] in any float dtype (cast to qkv's).
// Differentiable in qkv. v is a view of the input in both layouts.
RotatedQKV rotary_qkv(const torch::Tensor& qkv_BTC, int64_t n_heads, const RotaryTables& rope,
                      QKVLayout layout = QKVLayout::kHeadMajor);

// The layout the model uses on `device`: seq-major on CUDA when
// MOECPT_QKV_LAYOUT=seq_major (opt-in until a GPU run has timed it), else
// head-major (the CPU attention wants contiguous [B, H, T, Dh]). The variable
// is read once; a value other than head_major / seq_major is a moecpt::Error
// naming it.
QKVLayout qkv_layout_for(const torch::Device& device);
// MOECPT_QKV_LAYOUT as set, whatever the device (the model's constructor
// reads it, so a bad value stops a run before its first step).
QKVLayout qkv_layout_requested();
// The variable's value → layout (nullptr or "" → head-major); throws as above.
QKVLayout parse_qkv_layout(const char* value);
const char* qkv_layout_name(QKVLayout layout);

// The same through autograd's ops (select + apply_rotary): the reference the
// tests compare with, and the model's path when MOECPT_FUSED_ROPE=0 (A/B runs).
RotatedQKV rotary_qkv_composite(const torch::Tensor& qkv_BTC, int64_t n_heads, const RotaryTables& rope);

// False when MOECPT_FUSED_ROPE=0 (read once).
bool fused_rotary_enabled();

}  // namespace moecpt::model

// The decoder-only language model of SPEC §2:
//   tokens → embedding → [Block = Norm → Attention(RoPE) → +res; Norm → FFN → +res] × L
//          → Norm → head (tied or untied) → logits
// FFN is a gated MLP (dense) or an MoE (router + dispatch + grouped experts +
// shared experts) per block, as ModelConfig.ffn / moe_every say.
#pragma once
#include "core/config.h"
#include "core/pch.h"
#include "model/attention.h"
#include "model/mlp.h"
#include "model/moe.h"
#include "model/norm.h"
#include "model/router.h"

namespace moecpt::model {

struct ModelOutput {
  torch::Tensor logits_BTV;
  torch::Tensor aux_loss;             // scalar: sum over MoE layers (0 for dense)
  torch::Tensor z_loss;               // scalar: sum over MoE layers (0 for dense)
  std::vector<RoutingInfo> routing;   // one entry per MoE layer, in moe_layer_indices() order
};

class BlockImpl : public torch::nn::Module {
 public:
  BlockImpl(const ModelConfig& mc, const RouterConfig& rc, bool is_moe, double out_std);
  // The block on the residual stream x + a, where a is the previous block's
  // output not yet added (undefined for the first block), returning its own
  // output the same way: {h, y}, the stream after the block being h + y. Each
  // residual add happens in the norm that reads its sum (Norm::add_forward:
  // one fused kernel each way on CUDA with MOECPT_ADD_RMSNORM_KERNEL=1).
  // Appends this block's routing to `routing` when it is an MoE block.
  std::pair<torch::Tensor, torch::Tensor> forward(const torch::Tensor& x_BTD, const torch::Tensor& a_BTD,
                                                  const RotaryTables& rope, std::vector<RoutingInfo>& routing);

  Norm attn_norm{nullptr}, ffn_norm{nullptr};
  Attention attn{nullptr};
  GatedMLP mlp{nullptr};  // exactly one of mlp / moe is set
  MoE moe{nullptr};
};
TORCH_MODULE(Block);

class TransformerImpl : public torch::nn::Module {
 public:
  // Initialisation: every linear/embedding ~ N(0, init_std), except the
  // residual-out projections (attention out, MLP and expert w2) ~ N(0, init_std/√(2L))
  // so the residual stream's variance does not grow with depth (GPT-2).
  // Norm weights 1, LayerNorm biases 0, aux-loss-free biases 0.
  TransformerImpl(const ModelConfig& mc, const RouterConfig& rc);

  // tokens_BT: int64 [B, T]. Routing is in training mode when is_training()
  // (train()/eval() on this module; matters for Sinkhorn only).
  ModelOutput forward(const torch::Tensor& tokens_BT);

  // Embedding → blocks → final norm: the [B, T, D] states the head reads.
  // Appends each MoE layer's routing to `routing` (forward() and the fused-loss
  // forward, model/fused_ce.h, both run through here).
  torch::Tensor hidden_states(const torch::Tensor& tokens_BT, std::vector<RoutingInfo>& routing);

  // Activation checkpointing (model/activation_checkpoint.h), a training-memory
  // option: blocks l with l % every == 0 keep only their input for backward and
  // are recomputed there (every = 1: all blocks, Megatron's "full"; 0: off).
  // Losses and gradients are unchanged. Set by the trainer from
  // train.activation_checkpointing(_every).
  void set_activation_checkpointing(int64_t every);
  int64_t activation_checkpointing() const { return ac_every_; }

  // The residual stream's dtype under bf16 autocast (run.residual_dtype): with
  // bf16 on, the embedding output is cast to bf16 once and the blocks' adds,
  // norms and the head read and write bf16 (norm statistics stay fp32 inside;
  // the router casts its input to fp32). Off (default): the stream stays in the
  // embedding's fp32 and every matmul input is cast. No effect without autocast.
  void set_bf16_residual(bool on) { bf16_residual_ = on; }
  bool bf16_residual() const { return bf16_residual_; }

  const ModelConfig& config() const { return mc_; }
  std::vector<int64_t> moe_layer_indices() const;
  // The router of each MoE layer, in moe_layer_indices() order.
  std::vector<std::shared_ptr<Router>> routers() const;
  // Aux-loss-free balancing: after the optimizer step, with each MoE layer's
  // tokens_per_expert summed over the step's micro-batches (size = #MoE layers).
  // No-op for the other routers.
  void update_router_biases(const std::vector<torch::Tensor>& tokens_per_expert_per_layer);

  torch::nn::Embedding tok_emb{nullptr};
  torch::nn::ModuleList blocks{nullptr};
  Norm final_norm{nullptr};
  torch::nn::Linear head{nullptr};  // null when tied to tok_emb

 private:
  ModelConfig mc_;
  std::vector<Block> blocks_;  // typed view of `blocks`
  int64_t ac_every_ = 0;
  bool bf16_residual_ = false;
};

// Σ aux_loss and Σ z_loss over the MoE layers' routing (0-d fp32 zeros on
// `device` for a dense model).
std::pair<torch::Tensor, torch::Tensor> router_losses(const std::vector<RoutingInfo>& routing,
                                                      const torch::Device& device);
TORCH_MODULE(Transformer);

}  // namespace moecpt::model

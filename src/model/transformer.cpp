#include "model/transformer.h"

#include <cmath>

#include "core/error.h"
#include "model/activation_checkpoint.h"
#include "model/flops.h"

namespace moecpt::model {

BlockImpl::BlockImpl(const ModelConfig& mc, const RouterConfig& rc, bool is_moe, double out_std) {
  attn_norm = register_module("attn_norm", Norm(mc.norm, mc.d_model, mc.norm_eps));
  attn_norm->feeds_a_matmul = true;  // the q/k/v projection only
  attn = register_module("attn", Attention(mc.d_model, mc.n_heads, mc.init_std, out_std));
  ffn_norm = register_module("ffn_norm", Norm(mc.norm, mc.d_model, mc.norm_eps));
  if (is_moe) {
    moe = register_module("moe", MoE(mc, rc, out_std));
  } else {
    mlp = register_module("mlp", GatedMLP(mc.d_model, mc.ffn_hidden, mc.activation, mc.init_std, out_std));
  }
}

std::pair<torch::Tensor, torch::Tensor> BlockImpl::forward(const torch::Tensor& x_BTD, const torch::Tensor& a_BTD,
                                                           const RotaryTables& rope, std::vector<RoutingInfo>& routing) {
  // x = x + a (the previous block's output), normed for the attention
  auto [x, normed] = a_BTD.defined() ? attn_norm->add_forward(x_BTD, a_BTD) : std::pair{x_BTD, attn_norm(x_BTD)};
  auto [h, h_normed] = ffn_norm->add_forward(x, attn(normed, rope));  // h = x + attn(…), normed for the FFN
  if (mlp) return {h, mlp(h_normed)};
  auto moe_out = moe(h_normed);
  routing.push_back(std::move(moe_out.routing));
  return {h, moe_out.y_BTD};
}

TransformerImpl::TransformerImpl(const ModelConfig& mc, const RouterConfig& rc) : mc_(mc) {
  if (mc.ffn == "moe" && (mc.n_experts < 1 || mc.top_k > mc.n_experts)) {
    throw Error("model: an MoE model needs 1 <= top_k <= n_experts");
  }
  const double out_std = mc.init_std / std::sqrt(2.0 * double(mc.n_layers));
  tok_emb = register_module("tok_emb", torch::nn::Embedding(mc.vocab_size, mc.d_model));
  {
    torch::NoGradGuard no_grad;
    tok_emb->weight.normal_(0.0, mc.init_std);
  }
  blocks = register_module("blocks", torch::nn::ModuleList());
  const auto moe_layers = model::moe_layer_indices(mc);
  for (int64_t l = 0; l < mc.n_layers; ++l) {
    const bool is_moe = std::find(moe_layers.begin(), moe_layers.end(), l) != moe_layers.end();
    blocks_.push_back(Block(mc, rc, is_moe, out_std));
    blocks->push_back(blocks_.back());
  }
  final_norm = register_module("norm", Norm(mc.norm, mc.d_model, mc.norm_eps));
  if (!mc.tie_embeddings) {
    head = register_module("head", torch::nn::Linear(torch::nn::LinearOptions(mc.d_model, mc.vocab_size).bias(false)));
    torch::NoGradGuard no_grad;
    head->weight.normal_(0.0, mc.init_std);
  }
}

namespace {

// One block through model/activation_checkpoint.h: inputs the stream x (summed:
// one saved tensor per checkpoint) and the rotary tables; outputs the block's
// {h, y} and, for an MoE block, its aux and z losses, which must be
// outputs of the recomputed piece so that their gradients reach the router.
// The routing of the forward pass (counts, ids, scores: no gradients needed)
// is published into `routing` with the differentiable losses put back.
std::pair<torch::Tensor, torch::Tensor> checkpointed_block(const Block& block, const torch::Tensor& x_BTD,
                                                           const RotaryTables& rope, std::vector<RoutingInfo>& routing) {
  std::vector<RoutingInfo> first;
  auto* first_pass_routing = &first;  // written only during checkpointed() below
  auto fn = [impl = block.ptr(), first_pass_routing](const std::vector<torch::Tensor>& in, bool first_pass) {
    std::vector<RoutingInfo> r;
    auto [h, y] = impl->forward(in[0], torch::Tensor(), RotaryTables{in[1], in[2]}, r);
    std::vector<torch::Tensor> outs{h, y};
    if (!r.empty()) {
      outs.push_back(r[0].aux_loss);
      outs.push_back(r[0].z_loss);
    }
    if (first_pass) *first_pass_routing = std::move(r);
    return outs;
  };
  auto outs = checkpointed(fn, {x_BTD, rope.cos_TR, rope.sin_TR});
  if (!first.empty()) {
    first[0].aux_loss = outs[2];
    first[0].z_loss = outs[3];
    routing.push_back(std::move(first[0]));
  }
  return {outs[0], outs[1]};
}

}  // namespace

void TransformerImpl::set_activation_checkpointing(int64_t every) {
  if (every < 0) throw Error("activation checkpointing: every must be >= 0 (0 = off), got " + std::to_string(every));
  ac_every_ = every;
}

torch::Tensor TransformerImpl::hidden_states(const torch::Tensor& tokens_BT, std::vector<RoutingInfo>& routing) {
  const int64_t T = tokens_BT.size(1);
  auto rope = rotary_tables(T, mc_.d_model / mc_.n_heads, mc_.rope_theta, tokens_BT.device());
  // Under autocast q and k are bf16: cast the tables once here, not in every layer.
  if (compat::autocast_enabled(tokens_BT.device())) rope = {rope.cos_TR.to(torch::kBFloat16), rope.sin_TR.to(torch::kBFloat16)};
  auto x_BTD = tok_emb(tokens_BT);
  if (bf16_residual_ && compat::autocast_enabled(x_BTD.device())) x_BTD = x_BTD.to(torch::kBFloat16);
  const bool recompute = ac_every_ > 0 && torch::GradMode::is_enabled();
  torch::Tensor a_BTD;  // the last block's output, added to the stream by the next norm
  for (size_t l = 0; l < blocks_.size(); ++l) {
    if (recompute && int64_t(l) % ac_every_ == 0) {
      // a checkpoint keeps its inputs: the stream summed (one tensor, not two; this add is not fused)
      if (a_BTD.defined()) x_BTD = x_BTD + a_BTD;
      std::tie(x_BTD, a_BTD) = checkpointed_block(blocks_[l], x_BTD, rope, routing);
    } else {
      std::tie(x_BTD, a_BTD) = blocks_[l](x_BTD, a_BTD, rope, routing);
    }
  }
  return a_BTD.defined() ? final_norm->add_forward(x_BTD, a_BTD).second : final_norm(x_BTD);
}

std::pair<torch::Tensor, torch::Tensor> router_losses(const std::vector<RoutingInfo>& routing,
                                                      const torch::Device& device) {
  auto aux = torch::zeros({}, torch::TensorOptions().dtype(torch::kFloat32).device(device));
  auto z = aux;
  for (const auto& r : routing) {
    aux = aux + r.aux_loss;
    z = z + r.z_loss;
  }
  return {aux, z};
}

ModelOutput TransformerImpl::forward(const torch::Tensor& tokens_BT) {
  ModelOutput out;
  auto x_BTD = hidden_states(tokens_BT, out.routing);
  out.logits_BTV = head ? head(x_BTD) : torch::nn::functional::linear(x_BTD, tok_emb->weight);
  std::tie(out.aux_loss, out.z_loss) = router_losses(out.routing, tokens_BT.device());
  return out;
}

std::vector<int64_t> TransformerImpl::moe_layer_indices() const { return model::moe_layer_indices(mc_); }

std::vector<std::shared_ptr<Router>> TransformerImpl::routers() const {
  std::vector<std::shared_ptr<Router>> routers;
  for (const auto& block : blocks_) {
    if (block->moe) routers.push_back(block->moe->router);
  }
  return routers;
}

void TransformerImpl::update_router_biases(const std::vector<torch::Tensor>& tokens_per_expert_per_layer) {
  auto rs = routers();
  if (tokens_per_expert_per_layer.size() != rs.size()) {
    throw Error("update_router_biases: got " + std::to_string(tokens_per_expert_per_layer.size()) +
                " load vectors for " + std::to_string(rs.size()) + " MoE layers");
  }
  for (size_t i = 0; i < rs.size(); ++i) rs[i]->update_bias(tokens_per_expert_per_layer[i]);
}

}  // namespace moecpt::model

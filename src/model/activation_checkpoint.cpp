#include "model/activation_checkpoint.h"

#include "core/error.h"
#include "model/torch_compat.h"

namespace moecpt::model {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// What the backward needs besides the saved inputs, kept in ctx->saved_data.
struct RecomputeState : torch::CustomClassHolder {
  RecomputeFn fn;
  size_t n_inputs = 0;     // the caller's inputs
  size_t n_all = 0;        // those plus the dummy one, if any (see checkpointed)
  bool autocast = false;   // bf16 autocast was on for the inputs' device type
  torch::Device device = torch::kCPU;
};

class Recompute : public torch::autograd::Function<Recompute> {
 public:
  // Runs with grad mode off (Function::apply does that): nothing inside is recorded.
  static variable_list forward(AutogradContext* ctx, at::TensorList inputs,
                               c10::intrusive_ptr<RecomputeState> state) {
    std::vector<torch::Tensor> real(inputs.begin(), inputs.begin() + int64_t(state->n_inputs));
    auto outs = state->fn(real, /*first_pass=*/true);
    ctx->save_for_backward(real);
    ctx->saved_data["state"] = c10::IValue::make_capsule(std::move(state));
    return outs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto state = c10::static_intrusive_pointer_cast<RecomputeState>(ctx->saved_data["state"].toCapsule());
    const auto saved = ctx->get_saved_variables();
    std::vector<torch::Tensor> detached;
    detached.reserve(saved.size());
    for (const auto& t : saved) {
      auto d = t.detach();
      if (d.is_floating_point()) d.requires_grad_(t.requires_grad());
      detached.push_back(d);
    }
    std::vector<torch::Tensor> outs;
    {
      torch::AutoGradMode grad_on(true);
      std::optional<compat::Autocast> autocast;
      if (state->autocast) {
        // Autocast caches its casts of the weights; the forward pass's first
        // run made them under no-grad, without a path to the weights. If the
        // caller's autocast scope is still open (backward() inside it), they
        // would be reused here and the weights would get no gradient.
        at::autocast::clear_cache();
        autocast.emplace(state->device);
      }
      outs = state->fn(detached, /*first_pass=*/false);
    }
    if (outs.size() != grads.size())
      throw Error("activation checkpointing: the recomputed block returned " + std::to_string(outs.size()) +
                  " outputs, the forward " + std::to_string(grads.size()));
    // Backpropagate through the rerun: only outputs that depend on something
    // differentiable and got a gradient (an unused z-loss gets none).
    std::vector<torch::Tensor> roots, root_grads;
    for (size_t i = 0; i < outs.size(); ++i) {
      if (!grads[i].defined() || !outs[i].requires_grad()) continue;
      roots.push_back(outs[i]);
      root_grads.push_back(grads[i]);
    }
    if (!roots.empty()) torch::autograd::backward(roots, root_grads);

    variable_list in_grads;
    for (const auto& d : detached) in_grads.push_back(d.requires_grad() ? d.grad() : torch::Tensor());
    in_grads.resize(state->n_all + 1);  // none for the dummy input and the state argument
    return in_grads;
  }
};

}  // namespace

std::vector<torch::Tensor> checkpointed(RecomputeFn fn, const std::vector<torch::Tensor>& inputs) {
  if (!torch::GradMode::is_enabled()) return fn(inputs, /*first_pass=*/true);
  if (inputs.empty()) throw Error("activation checkpointing: a checkpointed block needs at least one input");
  auto state = c10::make_intrusive<RecomputeState>();
  state->fn = std::move(fn);
  state->n_inputs = inputs.size();
  state->device = inputs[0].device();
  state->autocast = compat::autocast_enabled(state->device);
  // Autograd records the Function only if an input requires grad; the block's
  // parameters are not inputs, so when no input does (e.g. a frozen
  // embedding), a dummy one that does keeps the parameters' gradients flowing.
  std::vector<torch::Tensor> all = inputs;
  bool any = false;
  for (const auto& t : inputs) any = any || t.requires_grad();
  if (!any) all.push_back(torch::empty({0}, inputs[0].options().dtype(torch::kFloat32)).requires_grad_());
  state->n_all = all.size();
  return Recompute::apply(at::TensorList(all), std::move(state));
}

}  // namespace moecpt::model

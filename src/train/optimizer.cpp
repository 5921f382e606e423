#include "train/optimizer.h"

#include <cstdlib>
#include <map>
#include <sstream>
#include <type_traits>

#include "core/error.h"
#include "model/torch_compat.h"

namespace moecpt {

namespace {

// The optimizer's state map is keyed by the parameter's TensorImpl: as its
// address printed to a string in LibTorch 1.13 (what c10::guts::to_string
// gave), as void* in 2.x.
template <class Map>
typename Map::key_type state_key(const Map&, const torch::Tensor& p) {
  if constexpr (std::is_same_v<typename Map::key_type, std::string>) {
    std::ostringstream os;
    os << static_cast<const void*>(p.unsafeGetTensorImpl());
    return os.str();
  } else {
    return static_cast<typename Map::key_type>(p.unsafeGetTensorImpl());
  }
}

}  // namespace

torch::optim::OptimizerParamState* find_param_state(torch::optim::Optimizer& opt, const torch::Tensor& p) {
  auto& states = opt.state();
  auto it = states.find(state_key(states, p));
  return it == states.end() ? nullptr : it->second.get();
}

FusedAdamW::FusedAdamW(const std::vector<torch::optim::OptimizerParamGroup>& groups,
                       torch::optim::AdamWOptions defaults, Mode mode)
    : torch::optim::AdamW(groups, std::move(defaults)), mode_(mode) {
  if (mode_ == Mode::kAuto) {
    const char* v = std::getenv("MOECPT_FUSED_ADAMW");
    if (v && std::string(v) == "0") mode_ = Mode::kLoop;
  }
  if (mode_ == Mode::kFused && !compiled())
    throw Error("fused AdamW needs LibTorch >= 2.4 (at::_fused_adamw_); this build has LibTorch " +
                std::string(TORCH_VERSION));
}

bool FusedAdamW::compiled() { return MOECPT_TORCH_AT_LEAST(2, 4); }

bool FusedAdamW::use_fused() const {
  if (mode_ != Mode::kAuto) return mode_ == Mode::kFused;
  if (!compiled()) return false;
  for (const auto& g : param_groups()) {
    if (static_cast<const torch::optim::AdamWOptions&>(g.options()).amsgrad()) return false;
    for (const auto& p : g.params())
      if (!p.is_cuda()) return false;
  }
  return true;
}

torch::Tensor FusedAdamW::step(LossClosure closure) {
  auto divisor = std::move(pending_divisor_);
  pending_divisor_ = torch::Tensor();
  if (!use_fused()) {
    last_path_ = "loop";
    if (divisor.defined()) {
      torch::NoGradGuard no_grad;
      auto scale = divisor.reciprocal();
      for (auto& group : param_groups())
        for (auto& p : group.params())
          if (p.grad().defined()) p.mutable_grad().mul_(scale.to(p.grad().scalar_type()));
    }
    return torch::optim::AdamW::step(std::move(closure));
  }
  last_path_ = "fused";
  torch::Tensor loss;
  if (closure) {
    torch::AutoGradMode grad_on(true);
    loss = closure();
  }
#if MOECPT_TORCH_AT_LEAST(2, 4)
  torch::NoGradGuard no_grad;
  for (auto& group : param_groups()) {
    const auto& o = static_cast<const torch::optim::AdamWOptions&>(group.options());
    if (o.amsgrad()) throw Error("fused AdamW: amsgrad is not supported");
    // Parameters that share a step count (all of them, unless some had no
    // gradient in some step) go into one kernel call; the step is a device
    // scalar the kernel reads (it is already incremented, as torch.optim does).
    struct Lists {
      std::vector<torch::Tensor> p, g, m, v;
    };
    std::map<std::pair<int64_t, std::string>, Lists> by_step;  // (step, device/dtype)
    for (auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      if (p.grad().is_sparse()) throw Error("fused AdamW: sparse gradients are not supported");
      auto& states = state();
      const auto key = state_key(states, p);
      auto it = states.find(key);
      if (it == states.end()) {
        auto s = std::make_unique<torch::optim::AdamWParamState>();
        s->step(0);
        s->exp_avg(torch::zeros_like(p, torch::MemoryFormat::Preserve));
        s->exp_avg_sq(torch::zeros_like(p, torch::MemoryFormat::Preserve));
        it = states.emplace(key, std::move(s)).first;
      }
      auto& s = static_cast<torch::optim::AdamWParamState&>(*it->second);
      s.step(s.step() + 1);
      auto& l = by_step[{s.step(), p.device().str() + "/" + std::string(c10::toString(p.scalar_type()))}];
      l.p.push_back(p);
      l.g.push_back(p.grad());
      l.m.push_back(s.exp_avg());
      l.v.push_back(s.exp_avg_sq());
    }
    const auto [beta1, beta2] = o.betas();
    for (auto& [k, l] : by_step) {
      auto step_t = torch::full({}, double(k.first), l.p[0].options().dtype(torch::kFloat32));
      std::vector<torch::Tensor> steps(l.p.size(), step_t);
      c10::optional<at::Tensor> grad_scale;
      if (divisor.defined()) grad_scale = divisor.to(l.p[0].device(), torch::kFloat32);
      at::_fused_adamw_(l.p, l.g, l.m, l.v, /*max_exp_avg_sqs=*/{}, steps, o.lr(), beta1, beta2, o.weight_decay(),
                        o.eps(), /*amsgrad=*/false, /*maximize=*/false, grad_scale);
    }
  }
#endif
  return loss;
}

std::unique_ptr<torch::optim::AdamW> make_adamw(torch::nn::Module& model, const OptimConfig& o,
                                                FusedAdamW::Mode mode) {
  std::vector<torch::Tensor> decay, no_decay;
  for (const auto& p : model.named_parameters()) {
    if (!p.value().requires_grad()) continue;
    const bool is_embedding = p.key().find("tok_emb") != std::string::npos;
    (p.value().dim() >= 2 && !is_embedding ? decay : no_decay).push_back(p.value());
  }
  auto opts = [&](double wd) {
    return std::make_unique<torch::optim::AdamWOptions>(
        torch::optim::AdamWOptions(o.lr).betas({o.beta1, o.beta2}).eps(o.eps).weight_decay(wd));
  };
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(decay, opts(o.weight_decay));
  groups.emplace_back(no_decay, opts(0.0));
  return std::make_unique<FusedAdamW>(groups, torch::optim::AdamWOptions(o.lr), mode);
}

void set_learning_rate(torch::optim::Optimizer& opt, double lr) {
  for (auto& g : opt.param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
}

// Global-norm gradient clipping on the device: the same maths as LibTorch's
// clip_grad_norm_ (coef = max_norm / (norm + 1e-6), applied when < 1) without its
// .item(). Returns the pre-clip norm as a 0-d fp32 device tensor (undefined if
// no parameter has a gradient).
torch::Tensor clip_grad_norm_on_device(const std::vector<torch::Tensor>& params, double max_norm,
                                       FusedAdamW* fold_into) {
#if MOECPT_TORCH_AT_LEAST(2, 1)
  // On a GPU: multi-tensor kernels (a few launches instead of two per parameter).
  {
    std::vector<torch::Tensor> grads;
    bool all_cuda = true;
    for (const auto& p : params)
      if (p.grad().defined()) {
        grads.push_back(p.grad());
        all_cuda = all_cuda && p.grad().is_cuda() && p.grad().scalar_type() == torch::kFloat32;
      }
    if (!grads.empty() && all_cuda) {
      auto total = torch::stack(at::_foreach_norm(grads, 2)).norm(2);
      if (fold_into && fold_into->use_fused()) {
        // grad / divisor = grad · coef inside the optimizer's kernel
        fold_into->set_pending_grad_divisor(((total + 1e-6) / max_norm).clamp_min(1.0));
        return total;
      }
      auto coef = (max_norm / (total + 1e-6)).clamp_max(1.0);
      at::_foreach_mul_(grads, coef);
      return total;
    }
  }
#endif
  std::vector<torch::Tensor> norms;
  for (const auto& p : params)
    if (p.grad().defined()) norms.push_back(p.grad().norm(2).to(torch::kFloat32));
  if (norms.empty()) return {};  // no gradients: nothing to clip, norm reported as 0
  auto total = torch::stack(norms).norm(2);
  auto coef = (max_norm / (total + 1e-6)).clamp_max(1.0);
  for (const auto& p : params)
    if (p.grad().defined()) p.grad().mul_(coef.to(p.grad().scalar_type()));
  return total;
}

}  // namespace moecpt

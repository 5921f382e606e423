#include "model/moe_expert_parallel.h"

#include <cmath>
#include <set>

#include "core/error.h"
#include "model/moe.h"
#include "train/distributed.h"
#include "train/optimizer.h"

namespace moecpt::model {

namespace {

int64_t sum_of(const std::vector<int64_t>& v) {
  int64_t s = 0;
  for (int64_t x : v) s += x;
  return s;
}

torch::Tensor exchange(const torch::Tensor& x, const std::vector<int64_t>& send_splits,
                       const std::vector<int64_t>& recv_splits, dist::Group& g) {
  auto in = x.contiguous();
  if (in.size(0) != sum_of(send_splits))
    throw Error("expert parallel: " + std::to_string(in.size(0)) + " rows to send but the splits sum to " +
                std::to_string(sum_of(send_splits)));
  auto sizes = in.sizes().vec();
  sizes[0] = sum_of(recv_splits);
  auto out = torch::empty(sizes, in.options());
  g.alltoall(out, in, recv_splits, send_splits, "expert-parallel all-to-all");
  return out;
}

// The autograd Function: forward sends rows with (send, recv) splits, backward
// sends the gradient rows back with the splits swapped. The group is passed by
// address (saved_data holds IValues); it outlives the graph (owned by the
// ExpertParallel of the layer, which lives as long as the model).
struct AllToAllFn : public torch::autograd::Function<AllToAllFn> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               std::vector<int64_t> send_splits, std::vector<int64_t> recv_splits, int64_t group) {
    ctx->saved_data["send"] = send_splits;
    ctx->saved_data["recv"] = recv_splits;
    ctx->saved_data["group"] = group;
    return exchange(x, send_splits, recv_splits, *reinterpret_cast<dist::Group*>(group));
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad) {
    const auto send = ctx->saved_data["send"].toIntVector();
    const auto recv = ctx->saved_data["recv"].toIntVector();
    auto* g = reinterpret_cast<dist::Group*>(ctx->saved_data["group"].toInt());
    return {exchange(grad[0], recv, send, *g), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

torch::optim::AdamWParamState* adamw_state(torch::optim::Optimizer* opt, const torch::Tensor& p) {
  if (!opt) return nullptr;
  auto* state = find_param_state(*opt, p);
  if (!state) return nullptr;
  auto* s = dynamic_cast<torch::optim::AdamWParamState*>(state);
  if (!s) throw Error("expert parallel: sharding the optimizer state supports AdamW only");
  return s;
}

}  // namespace

torch::Tensor all_to_all(const torch::Tensor& x, const std::vector<int64_t>& send_splits,
                         const std::vector<int64_t>& recv_splits, dist::Group& g) {
  return AllToAllFn::apply(x, send_splits, recv_splits, int64_t(reinterpret_cast<intptr_t>(&g)));
}

// --- ExpertParallel ---------------------------------------------------------

ExpertParallel::ExpertParallel(std::shared_ptr<dist::Group> ep_group, int64_t n_experts)
    : g_(std::move(ep_group)), n_experts_(n_experts) {
  const int64_t P = g_->size();
  if (n_experts % P != 0)
    throw Error("parallel.expert_parallel = " + std::to_string(P) + " must divide model.n_experts = " +
                std::to_string(n_experts));
  n_local_ = n_experts / P;
  first_ = int64_t(g_->rank()) * n_local_;
}

torch::Tensor ExpertParallel::run(GroupedExpertsImpl& local, const torch::Tensor& x_SD,
                                  const torch::Tensor& tokens_per_expert_E) {
  const int64_t P = g_->size(), El = n_local_;
  // 1. Counts first: rank j learns how many slots each rank sends to each of its experts.
  // (On the counts' device: NCCL exchanges device tensors only.)
  auto counts_dev = tokens_per_expert_E.to(torch::kInt64).contiguous();  // [E] = [P blocks × El]
  auto recv_dev = torch::empty_like(counts_dev);                          // [P sources × El]
  g_->alltoall(recv_dev, counts_dev, {}, {}, "expert-parallel token counts all-to-all");
  auto counts = counts_dev.cpu(), recv = recv_dev.cpu();
  const int64_t* c = counts.data_ptr<int64_t>();
  const int64_t* rc = recv.data_ptr<int64_t>();
  std::vector<int64_t> send_splits(size_t(P), 0), recv_splits(size_t(P), 0);
  for (int64_t j = 0; j < P; ++j)
    for (int64_t e = 0; e < El; ++e) {
      send_splits[size_t(j)] += c[j * El + e];
      recv_splits[size_t(j)] += rc[j * El + e];
    }

  // 2. Dispatch: slots are sorted by global expert id, hence by owner rank.
  auto x_recv = all_to_all(x_SD, send_splits, recv_splits, *g_);

  // 3. Received rows come in (source, local expert) blocks; regroup them by
  // local expert (source order within an expert) so each expert's rows are contiguous.
  std::vector<int64_t> block_start(size_t(P * El));
  int64_t off = 0;
  for (int64_t i = 0; i < P * El; ++i) block_start[size_t(i)] = off, off += rc[i];
  const int64_t R = off;
  auto perm = torch::empty({R}, torch::kInt64), inv = torch::empty({R}, torch::kInt64);
  auto local_counts = torch::zeros({El}, torch::kInt64);
  int64_t* pp = perm.data_ptr<int64_t>();
  int64_t* ip = inv.data_ptr<int64_t>();
  int64_t* lc = local_counts.data_ptr<int64_t>();
  int64_t k = 0;
  for (int64_t e = 0; e < El; ++e)
    for (int64_t i = 0; i < P; ++i) {
      const int64_t n = rc[i * El + e], s = block_start[size_t(i * El + e)];
      for (int64_t r = 0; r < n; ++r, ++k) pp[k] = s + r, ip[s + r] = k;
      lc[e] += n;
    }
  const auto dev = x_SD.device();
  auto x_loc = x_recv.index_select(0, perm.to(dev));

  // 4. Local experts. A rank that received nothing still returns a (0-row)
  // tensor attached to the graph, so that its backward all-to-all runs too.
  auto y_loc = R > 0 ? local.forward(x_loc, local_counts.to(tokens_per_expert_E.device())) : x_loc * 0;

  // 5. Back to (source, expert) order, then to the ranks the slots came from.
  auto y_recv = y_loc.index_select(0, inv.to(dev));
  return all_to_all(y_recv, recv_splits, send_splits, *g_);
}

// --- ExpertSharding -----------------------------------------------------------

ExpertSharding::ExpertSharding(torch::nn::Module& model, std::shared_ptr<dist::Group> world, int64_t ep_size)
    : model_(model), world_(std::move(world)), ep_size_(ep_size) {
  const int W = world_->size(), r = world_->rank();
  const int P = int(ep_size);
  if (P < 2 || W % P != 0)
    throw Error("parallel.expert_parallel = " + std::to_string(ep_size) + " must be >= 2 and divide WORLD_SIZE = " +
                std::to_string(W));
  for (const auto& mod : model_.modules(/*include_self=*/false))
    if (auto moe = std::dynamic_pointer_cast<MoEImpl>(mod)) layers_.push_back(moe);
  if (layers_.empty()) throw Error("parallel.expert_parallel > 1 needs an MoE model (model.ffn = \"moe\")");
  n_experts_ = layers_[0]->experts->w1_EDH.size(0);
  if (n_experts_ % P != 0)
    throw Error("parallel.expert_parallel = " + std::to_string(P) + " must divide model.n_experts = " +
                std::to_string(n_experts_));
  // EP group: P consecutive ranks; expert-data-parallel group: same position in every EP group.
  std::vector<int> ep_ranks, edp_ranks;
  for (int i = 0; i < P; ++i) ep_ranks.push_back(r / P * P + i);
  for (int i = r % P; i < W; i += P) edp_ranks.push_back(i);
  ep_ = world_->subgroup(ep_ranks, "ep" + std::to_string(r / P));
  if (W > P) edp_ = world_->subgroup(edp_ranks, "edp" + std::to_string(r % P));
  for (auto& l : layers_) {
    l->expert_parallel = std::make_shared<ExpertParallel>(ep_, n_experts_);
    for (auto* p : {&l->experts->w1_EDH, &l->experts->w3_EDH, &l->experts->w2_EHD}) expert_params_.push_back(*p);
  }
}

std::string ExpertSharding::describe() const {
  const int64_t W = world_->size();
  return "expert parallel: " + std::to_string(ep_size_) + " ranks per EP group, " +
         std::to_string(n_experts_ / ep_size_) + " of " + std::to_string(n_experts_) + " experts per rank, " +
         std::to_string(W / ep_size_) + " EP group(s); all-to-all on " + ep_->backend();
}

void ExpertSharding::shard(torch::optim::Optimizer* optimizer) {
  if (sharded_) return;
  torch::NoGradGuard no_grad;
  const int64_t first = int64_t(ep_->rank()) * (n_experts_ / ep_size_), n = n_experts_ / ep_size_;
  auto cut = [&](const torch::Tensor& t) { return t.narrow(0, first, n).clone(); };
  for (auto& p : expert_params_) {
    if (p.size(0) != n_experts_) throw Error("expert parallel: an expert weight is not of full size before sharding");
    if (auto* s = adamw_state(optimizer, p)) {
      s->exp_avg(cut(s->exp_avg()));
      s->exp_avg_sq(cut(s->exp_avg_sq()));
      if (s->max_exp_avg_sq().defined()) s->max_exp_avg_sq(cut(s->max_exp_avg_sq()));
    }
    p.set_data(cut(p.detach()));
    p.mutable_grad() = torch::Tensor();
  }
  sharded_ = true;
}

void ExpertSharding::unshard_to_rank0(torch::optim::Optimizer* optimizer) {
  if (!sharded_) return;
  for (auto& p : expert_params_) p.mutable_grad() = torch::Tensor();  // as unshard + shard: on every rank
  if (world_->rank() / ep_size_ != 0) return;  // not in rank 0's EP group: keep the shards
  torch::NoGradGuard no_grad;
  const bool root = ep_->rank() == 0;  // world rank 0 is the EP group's rank 0
  auto gather = [&](const torch::Tensor& t) {
    auto parts = ep_->gather(t, 0, "expert weight gather for a checkpoint");
    return root ? torch::cat(parts, 0) : torch::Tensor();
  };
  for (auto& p : expert_params_) {
    if (auto* s = adamw_state(optimizer, p)) {
      auto m = gather(s->exp_avg()), v = gather(s->exp_avg_sq());
      torch::Tensor vmax;
      if (s->max_exp_avg_sq().defined()) vmax = gather(s->max_exp_avg_sq());
      if (root) {
        s->exp_avg(m);
        s->exp_avg_sq(v);
        if (vmax.defined()) s->max_exp_avg_sq(vmax);
      }
    }
    auto full = gather(p.detach());
    if (root) p.set_data(full);
  }
  if (root) sharded_ = false;
}

std::vector<torch::Tensor> ExpertSharding::replicated_params() const {
  std::set<const void*> experts;
  for (const auto& p : expert_params_) experts.insert(p.unsafeGetTensorImpl());
  std::vector<torch::Tensor> out;
  for (const auto& p : model_.parameters())
    if (!experts.count(p.unsafeGetTensorImpl())) out.push_back(p);
  for (const auto& b : model_.buffers()) out.push_back(b);
  return out;
}

void ExpertSharding::reduce_expert_grads() {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> flat;
  for (auto& p : expert_params_) {
    // No token reached these experts in this step on any rank of the EP group:
    // zero, as one process (whose stacked expert gradient is zero there) has.
    if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);
    flat.push_back(p.grad().reshape({-1}));
  }
  auto all = torch::cat(flat);
  if (edp_) edp_->allreduce_sum(all, "expert gradient all-reduce");
  all.mul_(1.0 / double(world_->size()));
  int64_t off = 0;
  for (auto& p : expert_params_) {
    p.mutable_grad().copy_(all.narrow(0, off, p.numel()).view(p.sizes()));
    off += p.numel();
  }
}

double ExpertSharding::clip_grad_norm(double max_norm) {
  torch::NoGradGuard no_grad;
  std::set<const void*> experts;
  for (const auto& p : expert_params_) experts.insert(p.unsafeGetTensorImpl());
  double rep_sq = 0, exp_sq = 0;
  std::vector<torch::Tensor> grads;
  for (const auto& p : model_.parameters()) {
    if (!p.grad().defined()) continue;
    const double n = p.grad().norm(2).item<double>();
    (experts.count(p.unsafeGetTensorImpl()) ? exp_sq : rep_sq) += n * n;
    grads.push_back(p.grad());
  }
  // Each EP group holds every expert exactly once; replicas agree on the rest.
  exp_sq = ep_->sum(torch::tensor({exp_sq}, torch::kFloat64).to(expert_params_[0].device()), "gradient norm all-reduce").cpu().item<double>();
  const double total = std::sqrt(rep_sq + exp_sq);
  const double coef = std::min(1.0, max_norm / (total + 1e-6));
  for (auto& g : grads) g.mul_(coef);
  return total;
}

}  // namespace moecpt::model

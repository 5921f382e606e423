// Expert parallelism (docs/distributed.md): the E routed experts of every MoE
// layer are split into P contiguous blocks of E/P, one block per rank of an
// "EP group" of P ranks. Each rank routes its own tokens (router replicated),
// sends every routed slot to the rank that owns its expert with an all-to-all
// over c10d, runs its local experts on what it received, and sends the outputs
// back with the inverse all-to-all; the gate-weighted combine happens on the
// token's own rank as in the local MoE. Autograd flows through both exchanges
// (AllToAll below: its backward is the reverse all-to-all of the gradients).
//
// Layout of a job of W ranks with expert_parallel = P (P divides W and E):
//   EP group g = ranks [g·P, (g+1)·P)             — all-to-all of tokens
//   expert-data-parallel group c = {r : r mod P = c} — ranks holding the same
//                                                   experts; their expert
//                                                   gradients are all-reduced
// Everything else (attention, router, shared experts, embeddings) stays
// replicated on all W ranks and is all-reduced as in plain data parallel.
#pragma once
#include <memory>
#include <vector>

#include "core/pch.h"

namespace moecpt::dist {
class Group;
}

namespace moecpt::model {

class GroupedExpertsImpl;
class MoEImpl;

// Differentiable all-to-all along dim 0 over `g`: rows [Σ send_splits[<j],
// +send_splits[j]) go to rank j; the result holds recv_splits[i] rows from
// rank i, in rank order. Backward: the gradient rows go back the same way
// (splits swapped). Every rank of `g` must call it (and its backward) in the
// same order.
torch::Tensor all_to_all(const torch::Tensor& x, const std::vector<int64_t>& send_splits,
                         const std::vector<int64_t>& recv_splits, dist::Group& g);

// The dispatch of one MoE layer across an EP group. `local` holds this rank's
// E/P experts (global ids [rank·E/P, (rank+1)·E/P)).
class ExpertParallel {
 public:
  ExpertParallel(std::shared_ptr<dist::Group> ep_group, int64_t n_experts);

  // x_SD: this rank's routed slots sorted by (global) expert id;
  // tokens_per_expert_E: its slot counts per global expert. Returns the expert
  // outputs for those slots, in the same order — what GroupedExperts over all
  // E experts would return.
  torch::Tensor run(GroupedExpertsImpl& local, const torch::Tensor& x_SD, const torch::Tensor& tokens_per_expert_E);

  int64_t first_expert() const { return first_; }
  int64_t n_local() const { return n_local_; }

 private:
  std::shared_ptr<dist::Group> g_;
  int64_t n_experts_, n_local_, first_;
};

// Expert parallelism for a whole model, set up by the trainer. The model is
// built with all E experts on every rank (same seed / broadcast / checkpoint),
// then shard() keeps each rank's block; unshard_to_rank0() gathers them on
// rank 0 to write a layout-independent checkpoint. Parameters keep their identity
// (set_data), so the optimizer and gradient hooks stay valid.
class ExpertSharding {
 public:
  // Creates the EP and expert-data-parallel subgroups of `world` (a collective
  // on every rank) and installs ExpertParallel on every MoE layer of `model`.
  // Does not shard yet.
  ExpertSharding(torch::nn::Module& model, std::shared_ptr<dist::Group> world, int64_t ep_size);

  // Full → local expert weights, and AdamW state (exp_avg, exp_avg_sq, …) of
  // those weights when `optimizer` has any. Drops their gradients.
  void shard(torch::optim::Optimizer* optimizer);
  // Local → full on world rank 0 only (to write a checkpoint): a gather over
  // the EP group that holds rank 0; the other ranks keep their shards and do
  // not take part, so no rank but 0 ever holds all experts. Call on every
  // rank; shard() afterwards re-cuts rank 0's and leaves the others alone.
  void unshard_to_rank0(torch::optim::Optimizer* optimizer);

  // Parameters replicated on every rank (for the data-parallel reducer and the
  // replica consistency check), and the sharded expert weights.
  std::vector<torch::Tensor> replicated_params() const;
  const std::vector<torch::Tensor>& expert_params() const { return expert_params_; }

  // After backward (and after the data-parallel reducer): expert gradient =
  // (Σ over the expert-data-parallel group of each rank's gradient) / W.
  // Each rank's gradient already sums over the tokens of its whole EP group,
  // so this is the gradient of the mean over all W ranks' losses.
  void reduce_expert_grads();

  // clip_grad_norm_ over all parameters of the logical (unsharded) model: the
  // squared norms of the expert gradients are summed over the EP group.
  // Returns the total norm before clipping.
  double clip_grad_norm(double max_norm);

  int64_t ep_size() const { return ep_size_; }
  std::string describe() const;

 private:
  torch::nn::Module& model_;
  std::shared_ptr<dist::Group> world_, ep_, edp_;  // edp_ null when W = P
  int64_t ep_size_;
  int64_t n_experts_ = 0;
  std::vector<std::shared_ptr<MoEImpl>> layers_;
  std::vector<torch::Tensor> expert_params_;  // w1, w3, w2 of every MoE layer
  bool sharded_ = false;
};

}  // namespace moecpt::model

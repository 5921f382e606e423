// Routing statistics of SPEC §5 as pure functions of routing decisions
// (topk_ids_TK tensors), separate from running a model so each one is
// unit-testable on hand-built assignments. Shapes: T tokens, K choices per
// token, E routed experts, V vocabulary. Every function runs on CPU or device
// tensors; results come back on CPU.
//
// Streaming: LayerRoutingAccumulator sums the counts of one MoE layer over
// batches; the statistics are then functions of those counts.
#pragma once
#include <cstdint>
#include <vector>

#include "core/pch.h"

namespace moecpt::analysis {

// Routed slots per expert: [E] int64, sums to T·K.
torch::Tensor expert_counts(const torch::Tensor& topk_ids_TK, int64_t n_experts);

// MRI = max_i (1/T) Σ_x 1{i ∈ I_k(x)}: k/E when perfectly balanced, 1 when
// every token picks the same expert. counts_E from expert_counts over T tokens.
double max_routing_imbalance(const torch::Tensor& counts_E, int64_t tokens);
// The same from an assignment directly.
double mri_of_assignment(const torch::Tensor& topk_ids_TK, int64_t n_experts);

// Load fractions f_i = counts_i / Σ counts (share of routed slots; sums to 1).
std::vector<double> load_fractions(const torch::Tensor& counts_E);

// Experts whose load fraction is below `threshold` (default 1 %) of the fair
// share 1/E, in increasing id order.
std::vector<int64_t> dead_experts(const std::vector<double>& loads, double threshold = 0.01);

// Σ_x H(p(x)) in nats over the T rows of scores_TE, where p(x) is the row
// normalised to sum 1 (softmax scores already do; the bias router's sigmoid
// scores are normalised first). Divide by T for the mean router entropy.
double entropy_sum(const torch::Tensor& scores_TE);

// Co-activation counts: C[i][j] = #tokens routed to both i and j (C[i][i] =
// #tokens routed to i). [E, E] int64, symmetric.
torch::Tensor coactivation_counts(const torch::Tensor& topk_ids_TK, int64_t n_experts);
// Row-normalised co-activation: share of tokens routed to i that also go to j,
// C[i][j] / C[i][i] (row of zeros for an expert no token chose). Diagonal = 1.
std::vector<std::vector<double>> coactivation_shares(const torch::Tensor& coact_EE);

// Token-by-expert counts: N[v][e] = #occurrences of token id v routed to e.
// token_ids_T: int64 [T] (the input token at each position). [V, E] int64.
torch::Tensor token_expert_counts(const torch::Tensor& token_ids_T, const torch::Tensor& topk_ids_TK,
                                  int64_t vocab_size, int64_t n_experts);

// Vocabulary specialisation of one layer from N[v][e] (top_k = K): for every
// token id with at least `min_occurrences` occurrences, the share of its
// occurrences routed to its most frequent expert, max_e N[v][e] / occ(v)
// (occ(v) = Σ_e N[v][e] / K). `mean` is the occurrence-weighted average over
// those ids: 1 when every token id always goes to one expert (for K = 1),
// about K/E when routing ignores the token.
struct Specialisation {
  double mean = 0;          // occurrence-weighted average of the per-id share
  double mean_unweighted = 0;
  int64_t token_ids = 0;    // ids counted (occurrences >= min_occurrences)
  int64_t occurrences = 0;  // their occurrences
};
Specialisation vocabulary_specialisation(const torch::Tensor& token_expert_VE, int64_t top_k,
                                         int64_t min_occurrences = 10);

// Tokens whose favourite expert moved most between checkpoints a and b (same
// layer, same tokens): for ids seen >= min_occurrences times, with favourite
// f_a = argmax_e N_a[v][e], change = share_a(f_a) − share_b(f_a) (how much of v
// left its old favourite). Only ids whose favourite changed (f_b ≠ f_a), sorted
// by change, descending, at most `limit`.
struct FavouriteChange {
  int64_t token_id = 0;
  int64_t occurrences = 0;
  int64_t expert_before = 0, expert_after = 0;
  double share_before = 0;  // share of v's occurrences routed to expert_before under a
  double share_after = 0;   // share routed to expert_after under b
  double share_before_after = 0;  // share routed to expert_before under b
  double change = 0;        // share_before − share_before_after
};
std::vector<FavouriteChange> favourite_changes(const torch::Tensor& token_expert_a_VE,
                                               const torch::Tensor& token_expert_b_VE, int64_t top_k,
                                               int64_t min_occurrences = 10, int64_t limit = 20);

// Routing change between two checkpoints on the same T tokens (SPEC §5):
// Σ_x |I_k^a(x) ∩ I_k^b(x)| / k (divide by T for the overlap), and the number
// of tokens whose expert set differs at all.
struct OverlapCounts {
  double overlap_sum = 0;
  int64_t changed = 0;
  int64_t tokens = 0;
  double overlap() const { return tokens ? overlap_sum / double(tokens) : 1.0; }
  double changed_share() const { return tokens ? double(changed) / double(tokens) : 0.0; }
};
OverlapCounts overlap_counts(const torch::Tensor& topk_ids_a_TK, const torch::Tensor& topk_ids_b_TK);

// Domain affinity of one layer: per expert e and dataset d, the share of e's
// load coming from d. `counts_DE` holds each dataset's routed-slot counts.
// raw:  counts[d][e] / Σ_d counts[d][e]   (depends on how many tokens each dataset has)
// norm: f_d[e] / Σ_d f_d[e] with f_d = counts[d] / Σ_e counts[d][e]
//       (as if every dataset contributed the same number of tokens)
// Result [E][D]; rows of an expert with no load are all 0.
std::vector<std::vector<double>> domain_affinity(const std::vector<torch::Tensor>& counts_DE, bool normalise);

// The two choice rules of a Sinkhorn router on the same scores (SPEC §3):
// inference = top-k of the raw scores; training = top-k of the
// Sinkhorn-balanced S (model::sinkhorn_balance on log scores, equivalent to
// the logits because Sinkhorn is invariant to per-row shifts). scores_TE are
// softmax probabilities (RoutingInfo::scores_TE). [T, K] int64.
torch::Tensor inference_choice(const torch::Tensor& scores_TE, int64_t top_k);
struct BalancedChoice {
  torch::Tensor topk_ids_TK;
  int64_t iters = 0;
  double error = 0;
};
BalancedChoice sinkhorn_choice(const torch::Tensor& scores_TE, int64_t top_k, double tol, int64_t max_iters);

// Streaming accumulator of one MoE layer's routing over batches.
struct LayerRoutingAccumulator {
  int64_t n_experts = 0, top_k = 0, vocab_size = 0;
  int64_t tokens = 0;
  double entropy = 0;                // Σ_x H(p(x))
  torch::Tensor counts_E;            // int64 [E]
  torch::Tensor coact_EE;            // int64 [E, E]
  torch::Tensor token_expert_VE;     // int64 [V, E]; undefined when vocab_size = 0
  // Sinkhorn training-mode only: iterations / final error summed over batches.
  int64_t sinkhorn_batches = 0, sinkhorn_iters_sum = 0, sinkhorn_iters_max = 0;
  double sinkhorn_error_sum = 0, sinkhorn_error_max = 0;

  LayerRoutingAccumulator(int64_t E, int64_t K, int64_t V);
  // token_ids_T may be undefined (then no vocabulary statistics); scores_TE may
  // be undefined (then no entropy).
  void add(const torch::Tensor& topk_ids_TK, const torch::Tensor& token_ids_T, const torch::Tensor& scores_TE);
  double mri() const { return max_routing_imbalance(counts_E, tokens); }
  double mean_entropy() const { return tokens ? entropy / double(tokens) : 0.0; }
};

}  // namespace moecpt::analysis

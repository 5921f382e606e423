#include "analysis/routing_stats.h"

#include <algorithm>
#include <cmath>

#include "model/router_sinkhorn.h"

namespace moecpt::analysis {

namespace {
torch::Tensor cpu_long(const torch::Tensor& t) { return t.detach().to(torch::kCPU).to(torch::kInt64).contiguous(); }
}  // namespace

torch::Tensor expert_counts(const torch::Tensor& topk_ids_TK, int64_t n_experts) {
  return torch::bincount(cpu_long(topk_ids_TK).reshape({-1}), /*weights=*/{}, n_experts).to(torch::kInt64);
}

double max_routing_imbalance(const torch::Tensor& counts_E, int64_t tokens) {
  if (tokens <= 0) return 0.0;
  return counts_E.to(torch::kCPU).to(torch::kFloat64).max().item<double>() / double(tokens);
}

double mri_of_assignment(const torch::Tensor& topk_ids_TK, int64_t n_experts) {
  return max_routing_imbalance(expert_counts(topk_ids_TK, n_experts), topk_ids_TK.size(0));
}

std::vector<double> load_fractions(const torch::Tensor& counts_E) {
  auto c = counts_E.to(torch::kCPU).to(torch::kFloat64).contiguous();
  auto f = c / c.sum().clamp_min(1);
  return {f.data_ptr<double>(), f.data_ptr<double>() + f.numel()};
}

std::vector<int64_t> dead_experts(const std::vector<double>& loads, double threshold) {
  std::vector<int64_t> dead;
  const double fair = loads.empty() ? 0.0 : 1.0 / double(loads.size());
  for (size_t i = 0; i < loads.size(); ++i)
    if (loads[i] < threshold * fair) dead.push_back(int64_t(i));
  return dead;
}

double entropy_sum(const torch::Tensor& scores_TE) {
  auto p = scores_TE.detach().to(torch::kCPU).to(torch::kFloat64);
  p = p / p.sum(-1, /*keepdim=*/true).clamp_min(1e-300);
  // 0·log 0 = 0
  auto h = -(p * torch::log(p.clamp_min(1e-300))).sum(-1);
  return h.sum().item<double>();
}

torch::Tensor coactivation_counts(const torch::Tensor& topk_ids_TK, int64_t n_experts) {
  auto ids = cpu_long(topk_ids_TK);
  const int64_t T = ids.size(0);
  // One-hot membership M[x][i] = 1{i ∈ I_k(x)}; C = Mᵀ M counts tokens routed to both.
  auto M_TE = torch::zeros({T, n_experts}, torch::kFloat64);
  M_TE.scatter_(1, ids, 1.0);
  return torch::mm(M_TE.t(), M_TE).round().to(torch::kInt64);
}

std::vector<std::vector<double>> coactivation_shares(const torch::Tensor& coact_EE) {
  auto c = coact_EE.to(torch::kCPU).to(torch::kFloat64).contiguous();
  const int64_t E = c.size(0);
  std::vector<std::vector<double>> out(size_t(E), std::vector<double>(size_t(E), 0.0));
  auto a = c.accessor<double, 2>();
  for (int64_t i = 0; i < E; ++i) {
    if (a[i][i] <= 0) continue;
    for (int64_t j = 0; j < E; ++j) out[size_t(i)][size_t(j)] = a[i][j] / a[i][i];
  }
  return out;
}

torch::Tensor token_expert_counts(const torch::Tensor& token_ids_T, const torch::Tensor& topk_ids_TK,
                                  int64_t vocab_size, int64_t n_experts) {
  auto tok = cpu_long(token_ids_T).reshape({-1, 1});
  auto ids = cpu_long(topk_ids_TK);
  auto flat = (tok * n_experts + ids).reshape({-1});  // v·E + e for every routed slot
  return torch::bincount(flat, {}, vocab_size * n_experts).to(torch::kInt64).reshape({vocab_size, n_experts});
}

Specialisation vocabulary_specialisation(const torch::Tensor& token_expert_VE, int64_t top_k,
                                         int64_t min_occurrences) {
  auto N = token_expert_VE.to(torch::kCPU).to(torch::kFloat64);
  auto occ_V = N.sum(1) / double(top_k);
  auto fav_V = std::get<0>(N.max(1));
  auto keep = occ_V >= double(std::max<int64_t>(1, min_occurrences));
  Specialisation s;
  s.token_ids = keep.sum().item<int64_t>();
  if (s.token_ids == 0) return s;
  auto occ = occ_V.masked_select(keep), fav = fav_V.masked_select(keep);
  s.occurrences = int64_t(std::llround(occ.sum().item<double>()));
  s.mean = (fav.sum() / occ.sum()).item<double>();
  s.mean_unweighted = (fav / occ).mean().item<double>();
  return s;
}

std::vector<FavouriteChange> favourite_changes(const torch::Tensor& token_expert_a_VE,
                                               const torch::Tensor& token_expert_b_VE, int64_t top_k,
                                               int64_t min_occurrences, int64_t limit) {
  auto A = token_expert_a_VE.to(torch::kCPU).to(torch::kFloat64).contiguous();
  auto B = token_expert_b_VE.to(torch::kCPU).to(torch::kFloat64).contiguous();
  const int64_t V = A.size(0), E = A.size(1);
  auto a = A.accessor<double, 2>(), b = B.accessor<double, 2>();
  std::vector<FavouriteChange> out;
  for (int64_t v = 0; v < V; ++v) {
    double occ_a = 0, occ_b = 0;
    int64_t fa = 0, fb = 0;
    for (int64_t e = 0; e < E; ++e) {
      occ_a += a[v][e];
      occ_b += b[v][e];
      if (a[v][e] > a[v][fa]) fa = e;
      if (b[v][e] > b[v][fb]) fb = e;
    }
    occ_a /= double(top_k);
    occ_b /= double(top_k);
    if (occ_a < double(std::max<int64_t>(1, min_occurrences)) || occ_b < double(std::max<int64_t>(1, min_occurrences)) || fa == fb)
      continue;
    FavouriteChange c;
    c.token_id = v;
    c.occurrences = int64_t(std::llround(occ_a));
    c.expert_before = fa;
    c.expert_after = fb;
    c.share_before = a[v][fa] / occ_a;
    c.share_after = b[v][fb] / occ_b;
    c.share_before_after = b[v][fa] / occ_b;
    c.change = c.share_before - c.share_before_after;
    out.push_back(c);
  }
  std::stable_sort(out.begin(), out.end(), [](const auto& x, const auto& y) {
    return x.change != y.change ? x.change > y.change : x.occurrences > y.occurrences;
  });
  if (limit >= 0 && int64_t(out.size()) > limit) out.resize(size_t(limit));
  return out;
}

OverlapCounts overlap_counts(const torch::Tensor& topk_ids_a_TK, const torch::Tensor& topk_ids_b_TK) {
  auto a = cpu_long(topk_ids_a_TK), b = cpu_long(topk_ids_b_TK);
  const int64_t T = a.size(0), K = a.size(1);
  // |I_a ∩ I_b| per token: ids within one row are distinct, so count pairwise equal entries.
  auto inter_T = (a.unsqueeze(2) == b.unsqueeze(1)).sum({1, 2}).to(torch::kFloat64);
  OverlapCounts r;
  r.tokens = T;
  r.overlap_sum = (inter_T / double(K)).sum().item<double>();
  r.changed = (inter_T < double(K)).sum().item<int64_t>();
  return r;
}

std::vector<std::vector<double>> domain_affinity(const std::vector<torch::Tensor>& counts_DE, bool normalise) {
  if (counts_DE.empty()) return {};
  std::vector<torch::Tensor> rows;
  for (const auto& c : counts_DE) {
    auto r = c.to(torch::kCPU).to(torch::kFloat64);
    if (normalise) r = r / r.sum().clamp_min(1);
    rows.push_back(r);
  }
  auto M_DE = torch::stack(rows);
  auto share_ED = (M_DE / M_DE.sum(0, true).clamp_min(1e-300)).t().contiguous();
  const int64_t E = share_ED.size(0), D = share_ED.size(1);
  auto acc = share_ED.accessor<double, 2>();
  std::vector<std::vector<double>> out(size_t(E), std::vector<double>(size_t(D), 0.0));
  for (int64_t e = 0; e < E; ++e)
    for (int64_t d = 0; d < D; ++d) out[size_t(e)][size_t(d)] = acc[e][d];
  return out;
}

torch::Tensor inference_choice(const torch::Tensor& scores_TE, int64_t top_k) {
  return std::get<1>(scores_TE.detach().topk(top_k, -1));
}

BalancedChoice sinkhorn_choice(const torch::Tensor& scores_TE, int64_t top_k, double tol, int64_t max_iters) {
  // log of the softmax = logits − logsumexp(row): the row shift is absorbed by d0.
  auto log_scores = torch::log(scores_TE.detach().to(torch::kFloat32).clamp_min(1e-30));
  auto res = model::sinkhorn_balance(log_scores, tol, max_iters);
  BalancedChoice c;
  c.topk_ids_TK = std::get<1>(res.S_TE.topk(top_k, -1));
  c.iters = res.iters;
  c.error = res.error;
  return c;
}

LayerRoutingAccumulator::LayerRoutingAccumulator(int64_t E, int64_t K, int64_t V)
    : n_experts(E), top_k(K), vocab_size(V) {
  counts_E = torch::zeros({E}, torch::kInt64);
  coact_EE = torch::zeros({E, E}, torch::kInt64);
  if (V > 0) token_expert_VE = torch::zeros({V, E}, torch::kInt64);
}

void LayerRoutingAccumulator::add(const torch::Tensor& topk_ids_TK, const torch::Tensor& token_ids_T,
                                  const torch::Tensor& scores_TE) {
  auto ids = cpu_long(topk_ids_TK);
  tokens += ids.size(0);
  counts_E += expert_counts(ids, n_experts);
  coact_EE += coactivation_counts(ids, n_experts);
  if (token_expert_VE.defined() && token_ids_T.defined())
    token_expert_VE += token_expert_counts(token_ids_T, ids, vocab_size, n_experts);
  if (scores_TE.defined()) entropy += entropy_sum(scores_TE);
}

}  // namespace moecpt::analysis

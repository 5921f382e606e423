// Routing statistics (src/analysis/routing_stats.h) on hand-built assignments,
// against hand counts.
#include <gtest/gtest.h>

#include <cmath>

#include "analysis/routing_stats.h"

namespace moecpt::analysis {
namespace {

torch::Tensor ids(std::vector<std::vector<int64_t>> rows) {
  const int64_t T = int64_t(rows.size()), K = int64_t(rows[0].size());
  auto t = torch::empty({T, K}, torch::kInt64);
  for (int64_t i = 0; i < T; ++i)
    for (int64_t k = 0; k < K; ++k) t[i][k] = rows[size_t(i)][size_t(k)];
  return t;
}

TEST(AnalysisStats, MriIsKOverEWhenBalancedAndOneWhenAllPickOneExpert) {
  // k = 1, E = 3: every expert gets 2 of 6 tokens.
  EXPECT_DOUBLE_EQ(mri_of_assignment(ids({{0}, {1}, {2}, {0}, {1}, {2}}), 3), 1.0 / 3.0);
  // k = 2, E = 4: each expert in exactly half of the tokens.
  EXPECT_DOUBLE_EQ(mri_of_assignment(ids({{0, 1}, {2, 3}, {1, 2}, {3, 0}}), 4), 2.0 / 4.0);
  EXPECT_DOUBLE_EQ(mri_of_assignment(ids({{2}, {2}, {2}}), 3), 1.0);
  EXPECT_DOUBLE_EQ(mri_of_assignment(ids({{0, 1}, {1, 0}, {0, 1}}), 4), 1.0);
  // Skewed: expert 0 in 3 of 4 tokens.
  EXPECT_DOUBLE_EQ(mri_of_assignment(ids({{0}, {0}, {0}, {1}}), 2), 0.75);
}

TEST(AnalysisStats, LoadsAndDeadExperts) {
  auto c = expert_counts(ids({{0, 1}, {0, 1}, {0, 2}, {1, 0}}), 4);
  EXPECT_EQ(c[0].item<int64_t>(), 4);
  EXPECT_EQ(c[1].item<int64_t>(), 3);
  EXPECT_EQ(c[2].item<int64_t>(), 1);
  EXPECT_EQ(c[3].item<int64_t>(), 0);
  auto f = load_fractions(c);
  EXPECT_DOUBLE_EQ(f[0], 0.5);
  EXPECT_DOUBLE_EQ(f[2], 0.125);
  EXPECT_EQ(dead_experts(f), std::vector<int64_t>{3});
  // 1 % of the fair share 1/4 = 0.0025: 0.001 is dead, 0.003 is not.
  EXPECT_EQ(dead_experts({0.5, 0.496, 0.003, 0.001}), std::vector<int64_t>{3});
}

TEST(AnalysisStats, EntropyOfUniformAndOneHotScores) {
  auto s = torch::tensor({0.25, 0.25, 0.25, 0.25, 1.0, 0.0, 0.0, 0.0}, torch::kFloat64).reshape({2, 4});
  EXPECT_NEAR(entropy_sum(s), std::log(4.0), 1e-12);
  // Unnormalised (sigmoid) scores are normalised first: (1,1) -> ln 2.
  EXPECT_NEAR(entropy_sum(torch::tensor({{0.7, 0.7}}, torch::kFloat64)), std::log(2.0), 1e-12);
}

TEST(AnalysisStats, CoactivationMatchesHandCount) {
  auto a = ids({{0, 1}, {0, 2}, {1, 2}, {0, 1}});
  auto C = coactivation_counts(a, 3);
  const int64_t expect[3][3] = {{3, 2, 1}, {2, 3, 1}, {1, 1, 2}};
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) EXPECT_EQ(C[i][j].item<int64_t>(), expect[i][j]) << i << "," << j;
  auto sh = coactivation_shares(C);
  EXPECT_DOUBLE_EQ(sh[0][0], 1.0);
  EXPECT_DOUBLE_EQ(sh[0][1], 2.0 / 3.0);
  EXPECT_DOUBLE_EQ(sh[0][2], 1.0 / 3.0);
  EXPECT_DOUBLE_EQ(sh[2][0], 0.5);
  // An expert no token chose has a row of zeros.
  auto sh4 = coactivation_shares(coactivation_counts(a, 4));
  EXPECT_EQ(sh4[3], std::vector<double>(4, 0.0));
}

TEST(AnalysisStats, SpecialisationIsOneWhenEachTokenHasOneExpertAndKOverEWhenUniform) {
  const int64_t V = 5, E = 4;
  // Token v always goes to expert v % E, k = 1.
  std::vector<int64_t> tok;
  std::vector<std::vector<int64_t>> choice;
  for (int rep = 0; rep < 12; ++rep)
    for (int64_t v = 0; v < V; ++v) tok.push_back(v), choice.push_back({v % E});
  auto N = token_expert_counts(torch::tensor(tok), ids(choice), V, E);
  auto s = vocabulary_specialisation(N, 1, 10);
  EXPECT_DOUBLE_EQ(s.mean, 1.0);
  EXPECT_EQ(s.token_ids, V);
  EXPECT_EQ(s.occurrences, 60);

  // Uniform, k = 2: occurrence j of every token goes to {j, j+1} mod E.
  tok.clear();
  choice.clear();
  for (int64_t j = 0; j < 40; ++j)
    for (int64_t v = 0; v < V; ++v) tok.push_back(v), choice.push_back({j % E, (j + 1) % E});
  auto U = token_expert_counts(torch::tensor(tok), ids(choice), V, E);
  auto u = vocabulary_specialisation(U, 2, 10);
  EXPECT_NEAR(u.mean, 2.0 / 4.0, 1e-12);
  EXPECT_NEAR(u.mean_unweighted, 2.0 / 4.0, 1e-12);
  // Ids seen fewer than min_occurrences times are left out.
  EXPECT_EQ(vocabulary_specialisation(U, 2, 41).token_ids, 0);
}

TEST(AnalysisStats, FavouriteChangesByHand) {
  // 3 tokens, E = 2, k = 1. Token 0: 10×e0 → 2×e0 + 8×e1 (moved); token 1: stays on e1;
  // token 2: 6×e0 + 4×e1 → 4×e0 + 6×e1 (moved a little).
  auto A = torch::tensor({10, 0, 0, 10, 6, 4}, torch::kInt64).reshape({3, 2});
  auto B = torch::tensor({2, 8, 0, 10, 4, 6}, torch::kInt64).reshape({3, 2});
  auto ch = favourite_changes(A, B, 1, 10, 20);
  ASSERT_EQ(ch.size(), 2u);
  EXPECT_EQ(ch[0].token_id, 0);
  EXPECT_EQ(ch[0].expert_before, 0);
  EXPECT_EQ(ch[0].expert_after, 1);
  EXPECT_DOUBLE_EQ(ch[0].share_before, 1.0);
  EXPECT_DOUBLE_EQ(ch[0].share_after, 0.8);
  EXPECT_DOUBLE_EQ(ch[0].change, 0.8);
  EXPECT_EQ(ch[1].token_id, 2);
  EXPECT_NEAR(ch[1].change, 0.2, 1e-12);
  EXPECT_TRUE(favourite_changes(A, A, 1, 10, 20).empty());
}

TEST(AnalysisStats, OverlapWithItselfIsOneAndByHand) {
  auto a = ids({{0, 1}, {2, 3}, {1, 2}});
  auto o = overlap_counts(a, a);
  EXPECT_DOUBLE_EQ(o.overlap(), 1.0);
  EXPECT_EQ(o.changed, 0);
  // Order within a token does not matter; token 1 keeps one of two, token 2 none.
  auto b = ids({{1, 0}, {2, 0}, {3, 0}});
  auto p = overlap_counts(a, b);
  EXPECT_DOUBLE_EQ(p.overlap(), (1.0 + 0.5 + 0.0) / 3.0);
  EXPECT_EQ(p.changed, 2);
  EXPECT_DOUBLE_EQ(p.changed_share(), 2.0 / 3.0);
}

TEST(AnalysisStats, DomainAffinityByHand) {
  // Two datasets, E = 2. d0: 30 slots to e0, 10 to e1; d1: 10 to e0, 30 to e1 … but d1 has twice the tokens.
  std::vector<torch::Tensor> c = {torch::tensor({30, 10}, torch::kInt64), torch::tensor({20, 60}, torch::kInt64)};
  auto raw = domain_affinity(c, false);
  EXPECT_DOUBLE_EQ(raw[0][0], 30.0 / 50.0);
  EXPECT_DOUBLE_EQ(raw[0][1], 20.0 / 50.0);
  EXPECT_DOUBLE_EQ(raw[1][1], 60.0 / 70.0);
  auto norm = domain_affinity(c, true);  // f_d0 = (.75,.25), f_d1 = (.25,.75)
  EXPECT_DOUBLE_EQ(norm[0][0], 0.75);
  EXPECT_DOUBLE_EQ(norm[1][1], 0.75);
  EXPECT_DOUBLE_EQ(norm[1][0], 0.25);
}

TEST(AnalysisStats, SinkhornModesAgreeOnBalancedScoresAndDifferOnSkewedOnes) {
  // Balanced: token t prefers expert t mod 4, every expert preferred equally often.
  const int64_t T = 16, E = 4, K = 1;
  auto z = torch::zeros({T, E});
  for (int64_t t = 0; t < T; ++t) z[t][t % E] = 2.0 + 0.1 * double(t % 3);
  auto p = torch::softmax(z, -1);
  auto inf = inference_choice(p, K);
  auto tr = sinkhorn_choice(p, K, 1e-4, 100);
  EXPECT_TRUE(torch::equal(inf, tr.topk_ids_TK));
  EXPECT_GE(tr.iters, 1);
  EXPECT_LT(tr.error, 1e-4);
  EXPECT_DOUBLE_EQ(mri_of_assignment(inf, E), 0.25);

  // Skewed: every token slightly prefers expert 0. Inference sends all to 0 (MRI 1);
  // the balanced choice spreads them.
  torch::manual_seed(0);
  auto zs = torch::randn({T, E}, torch::TensorOptions().dtype(torch::kFloat32)) * 0.1;
  zs.select(1, 0).add_(0.5);
  auto ps = torch::softmax(zs, -1);
  EXPECT_DOUBLE_EQ(mri_of_assignment(inference_choice(ps, K), E), 1.0);
  auto bal = sinkhorn_choice(ps, K, 1e-4, 200);
  EXPECT_LT(mri_of_assignment(bal.topk_ids_TK, E), 0.6);
}

TEST(AnalysisStats, AccumulatorSumsBatches) {
  LayerRoutingAccumulator acc(3, 1, 4);
  acc.add(ids({{0}, {1}}), torch::tensor({0, 1}, torch::kInt64), torch::full({2, 3}, 1.0 / 3.0));
  acc.add(ids({{0}, {0}}), torch::tensor({0, 0}, torch::kInt64), torch::full({2, 3}, 1.0 / 3.0));
  EXPECT_EQ(acc.tokens, 4);
  EXPECT_DOUBLE_EQ(acc.mri(), 0.75);
  EXPECT_NEAR(acc.mean_entropy(), std::log(3.0), 1e-6);
  EXPECT_EQ(acc.token_expert_VE[0][0].item<int64_t>(), 3);
  EXPECT_EQ(acc.coact_EE[0][0].item<int64_t>(), 3);
}

}  // namespace
}  // namespace moecpt::analysis

// The bf16 residual stream (run.residual_dtype = "bfloat16", TransformerImpl::
// set_bf16_residual): under bf16 autocast the states between blocks are bf16,
// without autocast nothing changes, the losses and gradients stay as close to
// the fp32 model as plain autocast's are, and checkpointing recomputes it exactly.
#include <gtest/gtest.h>

#include <optional>

#include "core/config.h"
#include "core/error.h"
#include "model/fused_ce.h"
#include "model/torch_compat.h"
#include "model/transformer.h"
#include "test_models.h"

using namespace moecpt;
using namespace moecpt::model;

namespace {

struct Variant {
  std::string ffn, router, norm;
};
const Variant kVariants[] = {{"dense", "topk", "rmsnorm"},
                             {"moe", "topk", "rmsnorm"},
                             {"moe", "sinkhorn", "rmsnorm"},
                             {"dense", "topk", "layernorm"}};

Transformer make(const Variant& v, bool bf16_residual, int64_t recompute_every = 0) {
  auto mc = moecpt::testing::tiny_model_config(v.ffn);
  mc.norm = v.norm;
  RouterConfig rc;
  rc.type = v.router;
  torch::manual_seed(21);
  Transformer m(mc, rc);
  m->set_bf16_residual(bf16_residual);
  m->set_activation_checkpointing(recompute_every);
  return m;
}

struct Result {
  double loss = 0;
  torch::ScalarType stream = torch::kFloat32;  // dtype of hidden_states()
  std::vector<torch::Tensor> grads;             // fp64 copies, parameter order
};

// Forward (fused head, lm + aux + z) under bf16 autocast or not, backward outside it.
Result run(Transformer& m, bool autocast_on) {
  torch::manual_seed(5);
  auto tokens = torch::randint(64, {3, 13}, torch::kInt64);
  auto in = tokens.narrow(1, 0, 12), tgt = tokens.narrow(1, 1, 12);
  m->zero_grad();
  Result r;
  {  // the stream's dtype, in an autocast scope of its own: autocast caches the
     // weight casts it makes, and casts made under no-grad carry no gradient
    std::optional<compat::Autocast> autocast;
    if (autocast_on) autocast.emplace(torch::kCPU);
    torch::NoGradGuard no_grad;
    std::vector<RoutingInfo> routing;
    r.stream = m->hidden_states(in, routing).scalar_type();
  }
  torch::Tensor loss;
  {
    std::optional<compat::Autocast> autocast;
    if (autocast_on) autocast.emplace(torch::kCPU);
    auto out = forward_loss(*m, in, tgt);
    loss = out.lm_loss + out.aux_loss + out.z_loss;
  }
  loss.backward();
  r.loss = loss.item<double>();
  for (const auto& p : m->named_parameters()) {
    EXPECT_TRUE(p.value().grad().defined()) << p.key();
    r.grads.push_back(p.value().grad().defined() ? p.value().grad().to(torch::kFloat64) : torch::zeros({1}, torch::kFloat64));
  }
  return r;
}

// Largest relative L2 error of any parameter's gradient against `ref`.
double worst_grad_error(const Result& r, const Result& ref) {
  double worst = 0;
  for (size_t i = 0; i < ref.grads.size(); ++i) {
    const double scale = ref.grads[i].norm().item<double>();
    if (scale == 0) continue;
    worst = std::max(worst, (r.grads[i] - ref.grads[i]).norm().item<double>() / scale);
  }
  return worst;
}

}  // namespace

TEST(Bf16Residual, StreamIsBf16OnlyUnderAutocast) {
  for (const auto& v : kVariants) {
    SCOPED_TRACE(v.ffn + "/" + v.router + "/" + v.norm);
    auto plain = make(v, false), bf16 = make(v, true);
    // without autocast the option changes nothing, bit for bit
    const auto a = run(plain, false), b = run(bf16, false);
    EXPECT_EQ(a.stream, torch::kFloat32);
    EXPECT_EQ(b.stream, torch::kFloat32);
    EXPECT_EQ(a.loss, b.loss);
    for (size_t i = 0; i < a.grads.size(); ++i) EXPECT_TRUE(torch::equal(a.grads[i], b.grads[i])) << i;
    // under autocast: fp32 stream by default, bf16 with the option
    EXPECT_EQ(run(plain, true).stream, torch::kFloat32);
    EXPECT_EQ(run(bf16, true).stream, torch::kBFloat16);
  }
}

TEST(Bf16Residual, AsCloseToTheFp32ModelAsPlainAutocast) {
  // Reference: the fp32 model without autocast. Plain bf16 autocast (fp32
  // stream) is off by bf16 rounding; the bf16 stream adds the rounding of the
  // states between blocks and of their gradients, the same order of error.
  for (const auto& v : kVariants) {
    SCOPED_TRACE(v.ffn + "/" + v.router + "/" + v.norm);
    auto ref_model = make(v, false);
    const auto ref = run(ref_model, false);
    auto plain = make(v, false), bf16 = make(v, true);
    const auto p = run(plain, true), b = run(bf16, true);
    const double plain_loss_err = std::abs(p.loss - ref.loss), bf16_loss_err = std::abs(b.loss - ref.loss);
    const double plain_grad_err = worst_grad_error(p, ref), bf16_grad_err = worst_grad_error(b, ref);
    EXPECT_LT(bf16_loss_err, 4 * plain_loss_err + 2e-3 * std::abs(ref.loss)) << bf16_loss_err << " vs " << plain_loss_err;
    EXPECT_LT(bf16_grad_err, 4 * plain_grad_err + 1e-2) << bf16_grad_err << " vs " << plain_grad_err;
    EXPECT_LT(bf16_grad_err, 0.1);  // bf16 has ~3 significant digits; a wrong path is off by O(1)
    for (const auto& g : b.grads) EXPECT_TRUE(torch::isfinite(g).all().item<bool>());
  }
}

TEST(Bf16Residual, CheckpointingRecomputesTheBf16StreamExactly) {
  const Variant v{"moe", "topk", "rmsnorm"};
  auto plain = make(v, true, 0), recomputed = make(v, true, 1);
  const auto a = run(plain, true), b = run(recomputed, true);
  EXPECT_EQ(b.stream, torch::kBFloat16);
  EXPECT_EQ(a.loss, b.loss);
  for (size_t i = 0; i < a.grads.size(); ++i) EXPECT_TRUE(torch::equal(a.grads[i], b.grads[i])) << i;
}

TEST(Bf16Residual, ConfigNeedsTheBf16Dtype) {
  try {
    parse_config("[run]\nresidual_dtype = \"bfloat16\"\n", "x.toml");
    ADD_FAILURE() << "a bf16 stream without bf16 autocast was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("run.residual_dtype"), std::string::npos) << e.what();
  }
  EXPECT_EQ(parse_config("[run]\ndtype = \"bfloat16\"\nresidual_dtype = \"bfloat16\"\n", "x.toml").run.residual_dtype,
            "bfloat16");
  EXPECT_THROW(parse_config("[run]\nresidual_dtype = \"float16\"\n", "x.toml"), Error);
}

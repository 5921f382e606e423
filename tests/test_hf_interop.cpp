// Hugging Face export / import / sparse upcycling (model/hf_interop.h, docs/interop.md).
//  * export → import is bit-exact for dense, Switch, Granular (shared experts),
//    Mixtral-style and interleaved dense/MoE models;
//  * an independent safetensors header parser (written here, not core/safetensors)
//    finds every expected HF tensor with the right shape and dtype, and
//    config.json carries the right fields;
//  * an independent Python reference forward pass (tests/hf_reference.py,
//    following transformers' Llama / Mixtral / Qwen2-MoE code) gives the same
//    logits as moecpt on the exported files;
//  * upcycling a dense model gives an MoE with the same output;
//  * a short CPT run starts from an imported checkpoint.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>

#include "core/config.h"
#include "core/error.h"
#include "core/pch.h"
#include "core/safetensors.h"
#include "data/shard.h"
#include "model/hf_interop.h"
#include "model/transformer.h"
#include "train/checkpoint.h"
#include "train/trainer.h"
#include "test_util.h"

namespace moecpt {
namespace {
namespace fs = std::filesystem;
using json = nlohmann::json;

// Tiny models of every exportable kind. init_std is large so routing and
// logits are far from ties and from zero.
std::string recipe(const std::string& kind) {
  const std::string t = R"([run]
threads = 1
[model]
vocab_size = 48
d_model = 16
n_layers = 2
n_heads = 2
seq_len = 12
ffn_hidden = 24
init_std = 0.2
)";
  const std::string swiglu = "activation = \"swiglu\"\n", geglu = "activation = \"geglu\"\n";
  const std::string moe = "ffn = \"moe\"\n";
  if (kind == "dense") return t + swiglu;
  if (kind == "dense_geglu_tied") return t + geglu + "tie_embeddings = true\n";
  if (kind == "switch") return t + swiglu + moe + "n_experts = 4\ntop_k = 1\nexpert_hidden = 24\n";
  if (kind == "granular") return t + geglu + moe + "n_experts = 6\nn_shared_experts = 1\ntop_k = 2\nexpert_hidden = 8\n";
  if (kind == "mixtral")
    return t + swiglu + moe + "n_experts = 4\ntop_k = 2\nexpert_hidden = 12\n[router]\nrenormalize = true\n";
  if (kind == "interleaved")
    return t + swiglu + moe + "n_experts = 4\nn_shared_experts = 2\ntop_k = 2\nexpert_hidden = 6\nmoe_every = 2\n";
  if (kind == "sinkhorn_k2")
    return t + swiglu + moe + "n_experts = 4\ntop_k = 2\nexpert_hidden = 12\n[router]\ntype = \"sinkhorn\"\nrenormalize = true\n";
  throw Error("unknown test kind " + kind);
}

std::string expected_arch(const std::string& kind) {
  if (kind.rfind("dense", 0) == 0) return "llama";
  if (kind == "mixtral" || kind == "sinkhorn_k2") return "mixtral";
  return "qwen2_moe";
}

// Tests ship a tokenizer only where they say so (the repo's data/tokenizer may exist).
const std::string kNoTokenizer = "data.tokenizer=\"/nonexistent/moecpt-test.model\"";

const std::vector<std::string> kKinds = {"dense", "dense_geglu_tied", "switch", "granular",
                                         "mixtral", "interleaved", "sinkhorn_k2"};

// A checkpoint of a randomly initialised model with non-trivial norm weights.
Config make_checkpoint(const std::string& kind, const std::string& dir, uint64_t seed = 7) {
  Config cfg = parse_config(recipe(kind), kind, {kNoTokenizer});
  torch::manual_seed(seed);
  model::Transformer net(cfg.model, cfg.router);
  {
    torch::NoGradGuard no_grad;
    for (auto& p : net->named_parameters()) {
      if (p.key().find("norm") != std::string::npos) p.value().copy_(1.0 + 0.2 * torch::randn_like(p.value()));
    }
  }
  save_checkpoint(dir, *net, nullptr, json::object(), cfg);
  return cfg;
}

torch::Tensor logits_of(const std::string& ckpt, const torch::Tensor& tokens) {
  Config cfg = load_config(ckpt + "/config.toml");
  model::Transformer net(cfg.model, cfg.router);
  load_model_weights(ckpt, *net);
  net->eval();
  torch::NoGradGuard no_grad;
  return net->forward(tokens).logits_BTV;
}

void expect_same_weights(const std::string& a, const std::string& b) {
  auto fa = load_safetensors(a + "/model.safetensors"), fb = load_safetensors(b + "/model.safetensors");
  ASSERT_EQ(fa.tensors.size(), fb.tensors.size());
  for (const auto& [name, t] : fa.tensors) {
    ASSERT_TRUE(fb.tensors.count(name)) << name;
    EXPECT_TRUE(torch::equal(t, fb.tensors.at(name))) << name << " differs after the round trip";
  }
}

// ---------------------------------------------------------------------------
// Independent reader: only the safetensors header (8-byte LE length + JSON).
struct RawEntry {
  std::string dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;
};
struct RawFile {
  std::map<std::string, RawEntry> entries;
  json metadata;
  uint64_t buffer_bytes = 0;
};

RawFile parse_header(const std::string& path) {
  const std::string bytes = testing::read_text(path);
  RawFile f;
  if (bytes.size() < 8) throw Error(path + ": shorter than 8 bytes");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | uint8_t(bytes[size_t(i)]);
  if (8 + n > bytes.size()) throw Error(path + ": header runs past the file");
  json h = json::parse(bytes.substr(8, n));
  f.buffer_bytes = bytes.size() - 8 - n;
  for (const auto& [name, v] : h.items()) {
    if (name == "__metadata__") {
      f.metadata = v;
      continue;
    }
    RawEntry e;
    e.dtype = v.at("dtype").get<std::string>();
    e.shape = v.at("shape").get<std::vector<int64_t>>();
    e.begin = v.at("data_offsets")[0].get<uint64_t>();
    e.end = v.at("data_offsets")[1].get<uint64_t>();
    f.entries[name] = e;
  }
  return f;
}

// The tensors transformers expects, written out by hand from the HF module trees.
std::map<std::string, std::vector<int64_t>> expected_tensors(const ModelConfig& m, const std::string& arch) {
  std::map<std::string, std::vector<int64_t>> x;
  const int64_t D = m.d_model, V = m.vocab_size;
  x["model.embed_tokens.weight"] = {V, D};
  x["model.norm.weight"] = {D};
  if (!m.tie_embeddings) x["lm_head.weight"] = {V, D};
  for (int64_t l = 0; l < m.n_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    x[p + "input_layernorm.weight"] = {D};
    x[p + "post_attention_layernorm.weight"] = {D};
    for (std::string n : {"q_proj", "k_proj", "v_proj", "o_proj"}) x[p + "self_attn." + n + ".weight"] = {D, D};
    const bool moe = m.ffn == "moe" && (l + 1) % m.moe_every == 0;
    if (!moe) {
      x[p + "mlp.gate_proj.weight"] = {m.ffn_hidden, D};
      x[p + "mlp.up_proj.weight"] = {m.ffn_hidden, D};
      x[p + "mlp.down_proj.weight"] = {D, m.ffn_hidden};
    }
    if (arch == "mixtral") {
      x[p + "block_sparse_moe.gate.weight"] = {m.n_experts, D};
      for (int64_t e = 0; e < m.n_experts; ++e) {
        const std::string q = p + "block_sparse_moe.experts." + std::to_string(e) + ".";
        x[q + "w1.weight"] = {m.expert_hidden, D};
        x[q + "w3.weight"] = {m.expert_hidden, D};
        x[q + "w2.weight"] = {D, m.expert_hidden};
      }
    }
    if (arch == "qwen2_moe") {
      for (std::string n : {"q_proj", "k_proj", "v_proj"}) x[p + "self_attn." + n + ".bias"] = {D};
    }
    if (arch == "qwen2_moe" && moe) {
      x[p + "mlp.gate.weight"] = {m.n_experts, D};
      for (int64_t e = 0; e < m.n_experts; ++e) {
        const std::string q = p + "mlp.experts." + std::to_string(e) + ".";
        x[q + "gate_proj.weight"] = {m.expert_hidden, D};
        x[q + "up_proj.weight"] = {m.expert_hidden, D};
        x[q + "down_proj.weight"] = {D, m.expert_hidden};
      }
      const int64_t s = m.n_shared_experts > 0 ? m.n_shared_experts * m.expert_hidden : 1;
      x[p + "mlp.shared_expert.gate_proj.weight"] = {s, D};
      x[p + "mlp.shared_expert.up_proj.weight"] = {s, D};
      x[p + "mlp.shared_expert.down_proj.weight"] = {D, s};
      x[p + "mlp.shared_expert_gate.weight"] = {1, D};
    }
  }
  return x;
}

TEST(HfInterop, ExportImportRoundTripIsBitExact) {
  for (const auto& kind : kKinds) {
    SCOPED_TRACE(kind);
    testing::TempDir dir;
    Config cfg = make_checkpoint(kind, dir / "ckpt");
    auto rep = hf::export_hf(dir / "ckpt", dir / "hf");
    EXPECT_EQ(rep.arch, expected_arch(kind));
    // With the shipped moecpt_config.toml: weights and the whole config come back.
    hf::import_hf(dir / "hf", dir / "back");
    expect_same_weights(dir / "ckpt", dir / "back");
    EXPECT_EQ(to_toml(load_config(dir / "back/config.toml")), to_toml(cfg));
    // From config.json alone (what a foreign HF model offers): same weights, same model.
    fs::remove(dir / "hf/moecpt_config.toml");
    hf::import_hf(dir / "hf", dir / "back2");
    expect_same_weights(dir / "ckpt", dir / "back2");
    Config b = load_config(dir / "back2/config.toml");
    const auto &m0 = cfg.model, &m1 = b.model;
    EXPECT_EQ(m1.vocab_size, m0.vocab_size);
    EXPECT_EQ(m1.d_model, m0.d_model);
    EXPECT_EQ(m1.n_layers, m0.n_layers);
    EXPECT_EQ(m1.n_heads, m0.n_heads);
    EXPECT_EQ(m1.seq_len, m0.seq_len);
    EXPECT_EQ(m1.activation, m0.activation);
    EXPECT_EQ(m1.norm_eps, m0.norm_eps);
    EXPECT_EQ(m1.rope_theta, m0.rope_theta);
    EXPECT_EQ(m1.tie_embeddings, m0.tie_embeddings);
    EXPECT_EQ(m1.ffn, m0.ffn);
    EXPECT_EQ(m1.n_experts, m0.n_experts);
    EXPECT_EQ(m1.n_shared_experts, m0.n_shared_experts);
    EXPECT_EQ(m1.top_k, m0.top_k);
    EXPECT_EQ(m1.expert_hidden, m0.expert_hidden);
    EXPECT_EQ(m1.moe_every, m0.moe_every);
    if (m0.ffn == "moe") {
      EXPECT_EQ(b.router.renormalize && m1.top_k > 1, cfg.router.renormalize && m0.top_k > 1);
    }
    // The re-imported model computes the same logits.
    auto tokens = torch::randint(0, m0.vocab_size, {2, 9}, torch::kInt64);
    EXPECT_TRUE(torch::equal(logits_of(dir / "ckpt", tokens), logits_of(dir / "back2", tokens)));
  }
}

TEST(HfInterop, IndependentHeaderParserFindsEveryTensorAndConfigFields) {
  for (const auto& kind : kKinds) {
    SCOPED_TRACE(kind);
    testing::TempDir dir;
    Config cfg = make_checkpoint(kind, dir / "ckpt");
    const std::string arch = hf::export_hf(dir / "ckpt", dir / "hf").arch;
    RawFile f = parse_header(dir / "hf/model.safetensors");
    EXPECT_EQ(f.metadata.value("format", ""), "pt");  // transformers refuses other values
    auto want = expected_tensors(cfg.model, arch);
    EXPECT_EQ(f.entries.size(), want.size());
    std::vector<std::pair<uint64_t, uint64_t>> spans;
    for (const auto& [name, shape] : want) {
      auto it = f.entries.find(name);
      ASSERT_NE(it, f.entries.end()) << "missing " << name;
      EXPECT_EQ(it->second.dtype, "F32") << name;
      EXPECT_EQ(it->second.shape, shape) << name;
      int64_t numel = 1;
      for (auto s : shape) numel *= s;
      EXPECT_EQ(it->second.end - it->second.begin, uint64_t(numel) * 4) << name;
      spans.push_back({it->second.begin, it->second.end});
    }
    std::sort(spans.begin(), spans.end());
    uint64_t at = 0;
    for (const auto& [b, e] : spans) {
      EXPECT_EQ(b, at);  // contiguous, no overlap
      at = e;
    }
    EXPECT_EQ(at, f.buffer_bytes);

    json c = json::parse(testing::read_text(dir / "hf/config.json"));
    const auto& m = cfg.model;
    EXPECT_EQ(c["model_type"], arch);
    EXPECT_EQ(c["architectures"][0],
              arch == "llama" ? "LlamaForCausalLM" : arch == "mixtral" ? "MixtralForCausalLM" : "Qwen2MoeForCausalLM");
    EXPECT_EQ(c["vocab_size"], m.vocab_size);
    EXPECT_EQ(c["hidden_size"], m.d_model);
    EXPECT_EQ(c["num_hidden_layers"], m.n_layers);
    EXPECT_EQ(c["num_attention_heads"], m.n_heads);
    EXPECT_EQ(c["num_key_value_heads"], m.n_heads);
    EXPECT_EQ(c["head_dim"], m.d_model / m.n_heads);
    EXPECT_EQ(c["hidden_act"], m.activation == "swiglu" ? "silu" : "gelu");
    EXPECT_EQ(c["rms_norm_eps"].get<double>(), m.norm_eps);
    EXPECT_EQ(c["rope_theta"].get<double>(), m.rope_theta);
    EXPECT_TRUE(c["rope_scaling"].is_null());
    EXPECT_EQ(c["tie_word_embeddings"], m.tie_embeddings);
    if (arch == "llama") {
      EXPECT_EQ(c["intermediate_size"], m.ffn_hidden);
      EXPECT_EQ(c["attention_bias"], false);
    } else if (arch == "mixtral") {
      EXPECT_EQ(c["intermediate_size"], m.expert_hidden);
      EXPECT_EQ(c["num_local_experts"], m.n_experts);
      EXPECT_EQ(c["num_experts_per_tok"], m.top_k);
    } else {
      EXPECT_EQ(c["num_experts"], m.n_experts);
      EXPECT_EQ(c["num_experts_per_tok"], m.top_k);
      EXPECT_EQ(c["moe_intermediate_size"], m.expert_hidden);
      EXPECT_EQ(c["decoder_sparse_step"], m.moe_every);
      EXPECT_EQ(c["norm_topk_prob"], cfg.router.renormalize && m.top_k > 1);
      EXPECT_EQ(c["shared_expert_intermediate_size"], m.n_shared_experts > 0 ? m.n_shared_experts * m.expert_hidden : 1);
    }
  }
}

// Runs tests/hf_reference.py once on several exported directories; returns
// their logits (flat), or nothing with `skip` set when python3/torch is missing.
std::vector<torch::Tensor> python_logits(const testing::TempDir& dir, const std::vector<std::string>& model_dirs,
                                         const torch::Tensor& tokens, std::string& skip) {
  const std::string py = "/usr/bin/python3";
  if (!fs::exists(py)) {
    skip = "/usr/bin/python3 not found";
    return {};
  }
  json toks = json::array();
  for (int64_t b = 0; b < tokens.size(0); ++b) {
    json row = json::array();
    for (int64_t t = 0; t < tokens.size(1); ++t) row.push_back(tokens[b][t].item<int64_t>());
    toks.push_back(row);
  }
  testing::write_text(dir / "tokens.json", toks.dump());
  std::string cmd = py + " " + std::string(MOECPT_SOURCE_DIR) + "/tests/hf_reference.py " + (dir / "tokens.json");
  for (size_t i = 0; i < model_dirs.size(); ++i) cmd += " " + model_dirs[i] + " " + (dir / ("ref" + std::to_string(i) + ".bin"));
  cmd += " 2>&1";
  std::string out;
  FILE* p = ::popen(cmd.c_str(), "r");
  char buf[4096];
  size_t n;
  while (p && (n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  const int status = p ? ::pclose(p) : -1;
  const int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  if (code == 77) {
    skip = out;
    return {};
  }
  EXPECT_EQ(code, 0) << out;
  std::vector<torch::Tensor> res;
  for (size_t i = 0; i < model_dirs.size(); ++i) {
    const std::string bytes = testing::read_text(dir / ("ref" + std::to_string(i) + ".bin"));
    std::vector<float> v(bytes.size() / 4);
    if (!v.empty()) std::memcpy(v.data(), bytes.data(), v.size() * 4);
    res.push_back(torch::from_blob(v.data(), {int64_t(v.size())}, torch::kFloat32).clone());
  }
  return res;
}

TEST(HfInterop, IndependentPythonReferenceGivesTheSameLogits) {
  testing::TempDir dir;
  std::vector<std::string> hf_dirs;
  for (const auto& kind : kKinds) {
    make_checkpoint(kind, dir / ("ckpt-" + kind), 11);
    hf::export_hf(dir / ("ckpt-" + kind), dir / ("hf-" + kind));
    hf_dirs.push_back(dir / ("hf-" + kind));
  }
  torch::manual_seed(3);
  auto tokens = torch::randint(0, 48, {2, 10}, torch::kInt64);
  std::string skip;
  auto refs = python_logits(dir, hf_dirs, tokens, skip);
  if (!skip.empty()) GTEST_SKIP() << "independent Python reference not run: " << skip;
  ASSERT_EQ(refs.size(), kKinds.size());
  for (size_t i = 0; i < kKinds.size(); ++i) {
    SCOPED_TRACE(kKinds[i]);
    auto ours = logits_of(dir / ("ckpt-" + kKinds[i]), tokens).reshape({-1});
    ASSERT_EQ(refs[i].numel(), ours.numel());
    const double diff = (refs[i] - ours).abs().max().item<double>();
    std::printf("[ hf_reference ] %-16s max |logit diff| = %.3g (max |logit| = %.3g)\n", kKinds[i].c_str(), diff,
                ours.abs().max().item<double>());
    EXPECT_LT(diff, 1e-4);
    EXPECT_GT(ours.abs().max().item<double>(), 0.1);  // not a trivial all-zero comparison
  }
}

TEST(HfInterop, TokenizerFilesAreShippedAndImported) {
  testing::TempDir dir;
  make_checkpoint("dense", dir / "ckpt");
  testing::write_text(dir / "sp.model", "not really a sentencepiece model, only copied");
  hf::ExportOptions eo;
  eo.tokenizer = dir / "sp.model";
  auto rep = hf::export_hf(dir / "ckpt", dir / "hf", eo);
  EXPECT_TRUE(rep.tokenizer_copied);
  EXPECT_EQ(testing::read_text(dir / "hf/tokenizer.model"), testing::read_text(dir / "sp.model"));
  json tc = json::parse(testing::read_text(dir / "hf/tokenizer_config.json"));
  EXPECT_EQ(tc["tokenizer_class"], "LlamaTokenizer");
  EXPECT_EQ(tc["eos_token"], "</s>");  // moecpt: unk = 0, eos = 1, no BOS
  EXPECT_EQ(tc["unk_token"], "<unk>");
  EXPECT_EQ(tc["add_bos_token"], false);
  json c = json::parse(testing::read_text(dir / "hf/config.json"));
  EXPECT_EQ(c["eos_token_id"], 1);
  auto irep = hf::import_hf(dir / "hf", dir / "back");
  EXPECT_TRUE(irep.tokenizer_copied);
  EXPECT_EQ(testing::read_text(dir / "back/tokenizer.model"), testing::read_text(dir / "sp.model"));
  EXPECT_EQ(load_config(dir / "back/config.toml").data.tokenizer, dir / "back/tokenizer.model");
  // Without a tokenizer the export says so and still succeeds.
  rep = hf::export_hf(dir / "ckpt", dir / "hf2");
  EXPECT_FALSE(rep.tokenizer_copied);
  EXPECT_FALSE(rep.notes.empty());
}

TEST(HfInterop, UnfaithfulModelsAreRefusedWithOneClearError) {
  testing::TempDir dir;
  auto expect_refused = [&](const std::string& toml, const std::string& arch, const std::string& needle) {
    Config cfg = parse_config(toml, "refusal", {kNoTokenizer});
    model::Transformer net(cfg.model, cfg.router);
    save_checkpoint(dir / "c", *net, nullptr, json::object(), cfg);
    auto r = testing::run_moecpt("export --checkpoint " + (dir / "c") + " --format hf --out " + (dir / "hf") +
                                 (arch.empty() ? "" : " --arch " + arch));
    EXPECT_EQ(r.exit_code, 1) << r.output;
    EXPECT_NE(r.output.find(needle), std::string::npos) << r.output;
    EXPECT_NE(r.output.find("config.toml"), std::string::npos) << r.output;  // names the file
    EXPECT_FALSE(fs::exists(dir / "hf"));
  };
  expect_refused(recipe("dense") + "norm = \"layernorm\"\n", "", "LayerNorm");
  expect_refused(recipe("mixtral") + "type = \"bias\"\n", "", "aux-loss-free");
  expect_refused(recipe("switch") + "[router]\ntype = \"sinkhorn\"\n", "", "sigmoid");
  expect_refused(recipe("granular"), "mixtral", "use --arch qwen2_moe");
  expect_refused(recipe("switch"), "llama", "cannot be exported as llama");
}

TEST(HfInterop, ImportRefusesWhatItCannotRepresent) {
  testing::TempDir dir;
  make_checkpoint("granular", dir / "ckpt");
  hf::export_hf(dir / "ckpt", dir / "hf");
  fs::remove(dir / "hf/moecpt_config.toml");
  json c = json::parse(testing::read_text(dir / "hf/config.json"));
  auto try_import = [&](const json& cj) {
    testing::write_text(dir / "hf/config.json", cj.dump());
    return testing::run_moecpt("import --from " + (dir / "hf") + " --out " + (dir / "out"));
  };
  json gqa = c;
  gqa["num_key_value_heads"] = 1;
  auto r = try_import(gqa);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("num_key_value_heads"), std::string::npos) << r.output;
  json act = c;
  act["hidden_act"] = "gelu_pytorch_tanh";
  r = try_import(act);
  EXPECT_NE(r.output.find("hidden_act"), std::string::npos) << r.output;
  // A real (non-zero) Qwen2-MoE shared-expert gate is token-dependent: refused.
  auto st = load_safetensors(dir / "hf/model.safetensors");
  std::vector<std::pair<std::string, torch::Tensor>> ts;
  for (const auto& name : st.order) {
    auto t = st.tensors.at(name);
    if (name.find("shared_expert_gate") != std::string::npos) t = torch::full_like(t, 0.01);
    ts.emplace_back(name, t);
  }
  save_safetensors(dir / "hf/model.safetensors", ts, {{"format", "pt"}});
  r = try_import(c);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("shared_expert_gate"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(dir / "out"));
}

TEST(HfInterop, UpcycledMoEEqualsTheDenseModelWhenGatesSumToOne) {
  testing::TempDir dir;
  Config dense = make_checkpoint("dense", dir / "dense");
  auto r = testing::run_moecpt("export --checkpoint " + (dir / "dense") + " --format hf --out " + (dir / "hf"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = testing::run_moecpt("import --from " + (dir / "hf") + " --out " + (dir / "moe") +
                          " --upcycle-experts 4 --top-k 2 --seed 5");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  Config moe = load_config(dir / "moe/config.toml");
  EXPECT_EQ(moe.model.ffn, "moe");
  EXPECT_EQ(moe.model.n_experts, 4);
  EXPECT_EQ(moe.model.top_k, 2);
  EXPECT_EQ(moe.model.expert_hidden, dense.model.ffn_hidden);
  EXPECT_TRUE(moe.router.renormalize);
  // Every expert is the dense FFN (stored transposed: [E, D, H] vs [H, D]).
  auto d = load_safetensors(dir / "dense/model.safetensors").tensors;
  auto u = load_safetensors(dir / "moe/model.safetensors").tensors;
  for (int l = 0; l < 2; ++l) {
    const std::string p = "blocks." + std::to_string(l) + ".";
    for (int e = 0; e < 4; ++e) {
      EXPECT_TRUE(torch::equal(u.at(p + "moe.experts.w1")[e], d.at(p + "mlp.w1.weight").t()));
      EXPECT_TRUE(torch::equal(u.at(p + "moe.experts.w3")[e], d.at(p + "mlp.w3.weight").t()));
      EXPECT_TRUE(torch::equal(u.at(p + "moe.experts.w2")[e], d.at(p + "mlp.w2.weight").t()));
    }
    auto router = u.at(p + "moe.router.weight");
    EXPECT_EQ(router.sizes(), (std::vector<int64_t>{4, 16}));
    EXPECT_GT(router.std().item<double>(), 0.01);  // random, N(0, 0.02)
    EXPECT_LT(router.std().item<double>(), 0.04);
  }
  torch::manual_seed(9);
  auto tokens = torch::randint(0, 48, {2, 10}, torch::kInt64);
  auto ld = logits_of(dir / "dense", tokens), lu = logits_of(dir / "moe", tokens);
  EXPECT_LT((ld - lu).abs().max().item<double>(), 1e-5);
  // Without renormalisation (top-1 gate = p < 1) the output is scaled: not equal.
  r = testing::run_moecpt("import --from " + (dir / "hf") + " --out " + (dir / "moe1") +
                          " --upcycle-experts 4 --top-k 1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_GT((ld - logits_of(dir / "moe1", tokens)).abs().max().item<double>(), 1e-3);
  // Upcycling needs a dense source.
  make_checkpoint("switch", dir / "sw");
  hf::export_hf(dir / "sw", dir / "hfsw");
  hf::ImportOptions o;
  o.upcycle_experts = 4;
  EXPECT_THROW(hf::import_hf(dir / "hfsw", dir / "x", o), Error);
}

void write_domain(const std::string& dir) {
  fs::create_directories(dir);
  for (const char* split : {"train", "val"}) {
    std::vector<uint32_t> toks;
    std::vector<uint64_t> offs = {0};
    for (int doc = 0; doc < 20; ++doc) {
      for (int i = 0; i < 30; ++i) toks.push_back(2 + uint32_t(doc + 2 * i) % 40);
      toks.push_back(1);
      offs.push_back(toks.size());
    }
    write_shard(dir + "/" + split + ".bin", toks, offs, 48);
  }
}

TEST(HfInterop, ContinuedPretrainingStartsFromAnImportedCheckpoint) {
  testing::TempDir dir;
  make_checkpoint("granular", dir / "ckpt");
  hf::export_hf(dir / "ckpt", dir / "hf");
  fs::remove(dir / "hf/moecpt_config.toml");  // as if it were someone else's model
  write_domain(dir / "d0");
  testing::write_text(dir / "cpt.toml", "[data]\nshard_dir = \"" + dir.path().string() +
                                            "\"\ntrain = [\"d0\"]\nvalidation = [\"d0\"]\n"
                                            "[train]\nsteps = 3\nbatch_size = 2\neval_every = 0\neval_batches = 1\n"
                                            "[optim]\nlr = 1e-6\nmin_lr = 1e-7\n");
  auto r = testing::run_moecpt("import --from " + (dir / "hf") + " --out " + (dir / "imported") + " --config " +
                               (dir / "cpt.toml") + " --set run.threads=1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  Config cfg = load_config(dir / "imported/config.toml",
                           {"train.init_from=\"" + (dir / "imported") + "\"", "run.out_dir=\"" + (dir / "run") + "\""});
  EXPECT_EQ(cfg.model.seq_len, 12);
  PhaseSummary s = train(cfg);
  EXPECT_EQ(s.steps, 3);
  EXPECT_TRUE(std::isfinite(s.final_train_loss));
  // Tiny lr: the trained weights moved, but only by ~steps·lr from the import.
  auto a = load_safetensors(dir / "imported/model.safetensors").tensors;
  auto b = load_safetensors(dir / "run/checkpoints/final/model.safetensors").tensors;
  double max_move = 0;
  for (const auto& [name, t] : a) max_move = std::max(max_move, (t - b.at(name)).abs().max().item<double>());
  EXPECT_GT(max_move, 0.0);
  EXPECT_LT(max_move, 1e-4);
}

}  // namespace
}  // namespace moecpt

#include "model/hf_interop.h"

#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "core/atomic_file.h"
#include "core/config.h"
#include "core/error.h"
#include "core/pch.h"
#include "core/safetensors.h"
#include "model/flops.h"
#include "model/transformer.h"
#include "train/checkpoint.h"

namespace moecpt::hf {
namespace {
namespace fs = std::filesystem;
using json = nlohmann::json;

// ---------------------------------------------------------------------------
// The name mapping, shared by export and import. One Link ties HF tensor `hf`
// to (part of) our tensor `ours`:
//   Copy     hf = ours
//   Slice3   hf = ours rows [i·D, (i+1)·D)       (q/k/v of the fused qkv weight)
//   ExpertT  hf = ours[i]ᵀ                       (expert i of a [E, in, out] weight)
//   Twice    hf = 2·ours                         (Qwen2-MoE shared down_proj, see below)
//   Zero     hf = zeros(shape), no ours tensor   (Qwen2-MoE qkv biases, shared gate, absent shared expert)
// ---------------------------------------------------------------------------
enum class Op { Copy, Slice3, ExpertT, Twice, Zero };
struct Link {
  Link(std::string hf_name, std::string ours_name, Op o = Op::Copy, int64_t i = 0, std::vector<int64_t> zeros = {})
      : hf(std::move(hf_name)), ours(std::move(ours_name)), op(o), index(i), zero_shape(std::move(zeros)) {}
  std::string hf;
  std::string ours;
  Op op;
  int64_t index;
  std::vector<int64_t> zero_shape;
};

std::string L(int64_t l) { return std::to_string(l); }

std::vector<Link> mapping(const ModelConfig& m, const std::string& arch) {
  std::vector<Link> links;
  const int64_t D = m.d_model;
  const auto moe_layers = model::moe_layer_indices(m);
  auto is_moe = [&](int64_t l) { return std::find(moe_layers.begin(), moe_layers.end(), l) != moe_layers.end(); };
  links.push_back({"model.embed_tokens.weight", "tok_emb.weight"});
  for (int64_t l = 0; l < m.n_layers; ++l) {
    const std::string hp = "model.layers." + L(l) + ".", op = "blocks." + L(l) + ".";
    links.push_back({hp + "input_layernorm.weight", op + "attn_norm.weight"});
    const char* qkv[3] = {"q_proj", "k_proj", "v_proj"};
    for (int i = 0; i < 3; ++i) links.push_back({hp + "self_attn." + qkv[i] + ".weight", op + "attn.qkv.weight", Op::Slice3, i});
    if (arch == "qwen2_moe") {
      for (int i = 0; i < 3; ++i) links.push_back({hp + "self_attn." + qkv[i] + ".bias", "", Op::Zero, 0, {D}});
    }
    links.push_back({hp + "self_attn.o_proj.weight", op + "attn.out.weight"});
    links.push_back({hp + "post_attention_layernorm.weight", op + "ffn_norm.weight"});
    if (!is_moe(l)) {
      links.push_back({hp + "mlp.gate_proj.weight", op + "mlp.w1.weight"});
      links.push_back({hp + "mlp.up_proj.weight", op + "mlp.w3.weight"});
      links.push_back({hp + "mlp.down_proj.weight", op + "mlp.w2.weight"});
      continue;
    }
    if (arch == "mixtral") {
      links.push_back({hp + "block_sparse_moe.gate.weight", op + "moe.router.weight"});
      for (int64_t e = 0; e < m.n_experts; ++e) {
        const std::string ep = hp + "block_sparse_moe.experts." + L(e) + ".";
        links.push_back({ep + "w1.weight", op + "moe.experts.w1", Op::ExpertT, e});
        links.push_back({ep + "w2.weight", op + "moe.experts.w2", Op::ExpertT, e});
        links.push_back({ep + "w3.weight", op + "moe.experts.w3", Op::ExpertT, e});
      }
      continue;
    }
    // qwen2_moe
    links.push_back({hp + "mlp.gate.weight", op + "moe.router.weight"});
    for (int64_t e = 0; e < m.n_experts; ++e) {
      const std::string ep = hp + "mlp.experts." + L(e) + ".";
      links.push_back({ep + "gate_proj.weight", op + "moe.experts.w1", Op::ExpertT, e});
      links.push_back({ep + "up_proj.weight", op + "moe.experts.w3", Op::ExpertT, e});
      links.push_back({ep + "down_proj.weight", op + "moe.experts.w2", Op::ExpertT, e});
    }
    const std::string sp = hp + "mlp.shared_expert.";
    if (m.n_shared_experts > 0) {
      links.push_back({sp + "gate_proj.weight", op + "moe.shared.w1.weight"});
      links.push_back({sp + "up_proj.weight", op + "moe.shared.w3.weight"});
      links.push_back({sp + "down_proj.weight", op + "moe.shared.w2.weight", Op::Twice});
    } else {  // Qwen2-MoE always has a shared expert: an all-zero one of width 1 adds exactly 0
      links.push_back({sp + "gate_proj.weight", "", Op::Zero, 0, {1, D}});
      links.push_back({sp + "up_proj.weight", "", Op::Zero, 0, {1, D}});
      links.push_back({sp + "down_proj.weight", "", Op::Zero, 0, {D, 1}});
    }
    // sigmoid(0·x) = 0.5 exactly; with down_proj doubled (exact in binary floating
    // point) the gated shared expert equals our ungated one bit for bit.
    links.push_back({hp + "mlp.shared_expert_gate.weight", "", Op::Zero, 0, {1, D}});
  }
  links.push_back({"model.norm.weight", "norm.weight"});
  if (!m.tie_embeddings) links.push_back({"lm_head.weight", "head.weight"});
  return links;
}

std::string hf_activation(const std::string& ours) { return ours == "swiglu" ? "silu" : "gelu"; }

bool renormalized(const Config& cfg) { return cfg.router.renormalize && cfg.model.top_k > 1; }

std::string arch_for(const Config& cfg, const std::string& requested, const std::string& origin) {
  const auto& m = cfg.model;
  auto refuse = [&](const std::string& why) -> Error {
    return file_error(origin, "cannot export to Hugging Face format: " + why);
  };
  static const std::set<std::string> known = {"auto", "llama", "mixtral", "qwen2_moe"};
  if (!known.count(requested)) throw refuse("unknown --arch '" + requested + "' (auto | llama | mixtral | qwen2_moe)");
  if (m.norm != "rmsnorm") {
    throw refuse("model.norm = \"" + m.norm + "\": Llama, Mixtral and Qwen2-MoE all use RMSNorm without a bias, "
                 "so a LayerNorm model has no exact counterpart");
  }
  if (m.ffn == "dense") {
    if (requested != "auto" && requested != "llama") throw refuse("a dense model exports as llama only");
    return "llama";
  }
  if (requested == "llama") throw refuse("an MoE model cannot be exported as llama");
  if (cfg.router.type == "bias") {
    throw refuse("router.type = \"bias\" (aux-loss-free) picks experts by sigmoid score + a learned per-expert "
                 "bias; Mixtral and Qwen2-MoE pick by softmax probability, so routing would differ");
  }
  if (cfg.router.type == "sinkhorn" && m.top_k == 1) {
    throw refuse("router.type = \"sinkhorn\" with top_k = 1 gates by sigmoid(logit); Mixtral and Qwen2-MoE gate "
                 "by softmax probability");
  }
  const bool mixtral_ok = m.n_shared_experts == 0 && m.moe_every == 1 && renormalized(cfg);
  if (requested == "mixtral" && !mixtral_ok) {
    throw refuse("mixtral needs every block MoE (moe_every = 1), no shared experts and top_k >= 2 with "
                 "router.renormalize = true (Mixtral always renormalises the top-k gates to sum 1); "
                 "use --arch qwen2_moe (or auto)");
  }
  if (requested == "mixtral" || (requested == "auto" && mixtral_ok)) return "mixtral";
  return "qwen2_moe";
}

json hf_config(const Config& cfg, const std::string& arch) {
  const auto& m = cfg.model;
  json j;
  j["architectures"] = {arch == "llama" ? "LlamaForCausalLM" : arch == "mixtral" ? "MixtralForCausalLM" : "Qwen2MoeForCausalLM"};
  j["model_type"] = arch;
  j["vocab_size"] = m.vocab_size;
  j["hidden_size"] = m.d_model;
  j["num_hidden_layers"] = m.n_layers;
  j["num_attention_heads"] = m.n_heads;
  j["num_key_value_heads"] = m.n_heads;
  j["head_dim"] = m.d_model / m.n_heads;
  j["hidden_act"] = hf_activation(m.activation);
  j["max_position_embeddings"] = m.seq_len;
  j["rms_norm_eps"] = m.norm_eps;
  j["rope_theta"] = m.rope_theta;
  j["rope_scaling"] = nullptr;
  j["tie_word_embeddings"] = m.tie_embeddings;
  j["initializer_range"] = m.init_std;
  j["attention_dropout"] = 0.0;
  j["torch_dtype"] = "float32";
  j["use_cache"] = true;
  j["bos_token_id"] = nullptr;  // the moecpt tokenizer has no BOS
  j["eos_token_id"] = 1;
  if (arch == "llama") {
    j["intermediate_size"] = m.ffn_hidden;
    j["attention_bias"] = false;
    j["mlp_bias"] = false;
    j["pretraining_tp"] = 1;
  } else if (arch == "mixtral") {
    j["intermediate_size"] = m.expert_hidden;
    j["num_local_experts"] = m.n_experts;
    j["num_experts_per_tok"] = m.top_k;
    j["router_aux_loss_coef"] = cfg.router.aux_alpha;
    j["output_router_logits"] = false;
    j["sliding_window"] = nullptr;
  } else {
    j["intermediate_size"] = m.ffn_hidden;
    j["moe_intermediate_size"] = m.expert_hidden;
    j["shared_expert_intermediate_size"] = m.n_shared_experts > 0 ? m.n_shared_experts * m.expert_hidden : 1;
    j["num_experts"] = m.n_experts;
    j["num_experts_per_tok"] = m.top_k;
    j["norm_topk_prob"] = renormalized(cfg);
    j["decoder_sparse_step"] = m.moe_every;
    j["mlp_only_layers"] = json::array();
    j["qkv_bias"] = true;  // older transformers hard-code q/k/v biases: we write zeros, so both agree
    j["use_sliding_window"] = false;
    j["sliding_window"] = nullptr;
    j["max_window_layers"] = m.n_layers;
    j["router_aux_loss_coef"] = cfg.router.aux_alpha;
    j["output_router_logits"] = false;
  }
  return j;
}

void write_tokenizer_files(const std::string& dir, const std::string& sp_model, int64_t seq_len) {
  fs::copy_file(sp_model, dir + "/tokenizer.model", fs::copy_options::overwrite_existing);
  // Llama-style slow tokenizer over our sentencepiece model: unk = 0 "<unk>",
  // eos = 1 "</s>", no BOS, no padding token (SPEC tokenizer settings).
  json tc = {{"tokenizer_class", "LlamaTokenizer"},
             {"add_bos_token", false},
             {"add_eos_token", false},
             {"bos_token", nullptr},
             {"eos_token", "</s>"},
             {"unk_token", "<unk>"},
             {"pad_token", nullptr},
             {"legacy", true},
             {"add_prefix_space", nullptr},
             {"clean_up_tokenization_spaces", false},
             {"model_max_length", seq_len},
             {"sp_model_kwargs", json::object()}};
  write_file_atomic(dir + "/tokenizer_config.json", tc.dump(2) + "\n");
  json st = {{"eos_token", "</s>"}, {"unk_token", "<unk>"}};
  write_file_atomic(dir + "/special_tokens_map.json", st.dump(2) + "\n");
}

std::map<std::string, torch::Tensor> named_tensors(torch::nn::Module& model) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& p : model.named_parameters()) out[p.key()] = p.value();
  for (const auto& b : model.named_buffers()) out[b.key()] = b.value();
  return out;
}

// ------------------------------- import helpers -------------------------------

template <class T>
T get_or(const json& j, const std::string& key, T fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  return it->get<T>();
}

std::map<std::string, torch::Tensor> load_hf_weights(const std::string& dir, std::vector<std::string>& files) {
  const std::string index = dir + "/model.safetensors.index.json";
  if (fs::exists(index)) {
    json j;
    try {
      j = json::parse(read_file(index));
    } catch (const json::exception& e) {
      throw file_error(index, std::string("invalid JSON: ") + e.what());
    }
    if (!j.contains("weight_map") || !j["weight_map"].is_object()) throw file_error(index, "no \"weight_map\" object");
    std::set<std::string> uniq;
    for (const auto& [name, file] : j["weight_map"].items()) {
      if (!file.is_string() || file.get<std::string>().find('/') != std::string::npos) {
        throw file_error(index, "weight_map entry '" + name + "' does not name a file in the directory");
      }
      uniq.insert(file.get<std::string>());
    }
    files.assign(uniq.begin(), uniq.end());
  } else if (fs::exists(dir + "/model.safetensors")) {
    files = {"model.safetensors"};
  } else {
    throw file_error(dir, "no model.safetensors or model.safetensors.index.json (only safetensors weights are supported)");
  }
  std::map<std::string, torch::Tensor> all;
  for (const auto& f : files) {
    auto file = load_safetensors(dir + "/" + f);
    for (auto& [name, t] : file.tensors) {
      if (all.count(name)) throw file_error(dir + "/" + f, "tensor '" + name + "' appears in more than one shard");
      all[name] = t;
    }
  }
  return all;
}

bool all_zero(const torch::Tensor& t) { return t.numel() == 0 || t.abs().max().item<double>() == 0.0; }

}  // namespace

// ================================== export ==================================

std::string choose_arch(const std::string& config_toml_path, const std::string& requested) {
  return arch_for(load_config(config_toml_path), requested, config_toml_path);
}

ExportReport export_hf(const std::string& checkpoint_dir, const std::string& out_dir, const ExportOptions& opts) {
  const std::string cfg_path = checkpoint_dir + "/config.toml";
  if (!fs::exists(cfg_path)) throw file_error(cfg_path, "checkpoint config not found (is this a checkpoint directory?)");
  const Config cfg = load_config(cfg_path);
  ExportReport rep;
  rep.arch = arch_for(cfg, opts.arch, cfg_path);
  if (cfg.router.type == "sinkhorn" && cfg.model.ffn == "moe") {
    rep.notes.push_back("Sinkhorn balancing is training-only; at inference moecpt routes by plain top-k of the "
                        "logits, which is exactly what the exported model does");
  }
  if (cfg.model.ffn == "moe" && rep.arch == "qwen2_moe") {
    rep.notes.push_back("qwen2_moe: shared_expert_gate is all-zero (sigmoid = 0.5) and shared down_proj is doubled, "
                        "so the gated shared expert equals moecpt's ungated one");
    if (cfg.model.n_shared_experts == 0) {
      rep.notes.push_back("qwen2_moe: no shared experts, written as an all-zero shared expert of width 1 (adds exactly 0)");
    }
  }

  torch::NoGradGuard no_grad;
  model::Transformer net(cfg.model, cfg.router);
  load_model_weights(checkpoint_dir, *net);
  auto ours = named_tensors(*net);

  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  const int64_t D = cfg.model.d_model;
  for (const auto& link : mapping(cfg.model, rep.arch)) {
    torch::Tensor t;
    if (link.op == Op::Zero) {
      t = torch::zeros(link.zero_shape, torch::kFloat32);
    } else {
      auto it = ours.find(link.ours);
      if (it == ours.end()) throw Error("export: moecpt tensor '" + link.ours + "' not found (internal mapping error)");
      const auto& src = it->second;
      switch (link.op) {
        case Op::Copy: t = src; break;
        case Op::Slice3: t = src.narrow(0, link.index * D, D); break;
        case Op::ExpertT: t = src[link.index].t(); break;
        case Op::Twice: t = src * 2.0; break;
        case Op::Zero: break;
      }
    }
    tensors.emplace_back(link.hf, t.to(torch::kFloat32).contiguous());
  }

  const std::string tmp = out_dir + ".tmp";
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  save_safetensors(tmp + "/model.safetensors", tensors, {{"format", "pt"}});
  write_file_atomic(tmp + "/config.json", hf_config(cfg, rep.arch).dump(2) + "\n");
  json gen = {{"eos_token_id", 1}, {"bos_token_id", nullptr}, {"do_sample", false}};
  write_file_atomic(tmp + "/generation_config.json", gen.dump(2) + "\n");
  // The full moecpt config, so `moecpt import` restores router settings and the
  // rest of the run config exactly (transformers ignores this file).
  fs::copy_file(cfg_path, tmp + "/moecpt_config.toml", fs::copy_options::overwrite_existing);
  const std::string sp = opts.tokenizer.empty() ? cfg.data.tokenizer : opts.tokenizer;
  if (fs::exists(sp)) {
    write_tokenizer_files(tmp, sp, cfg.model.seq_len);
    rep.tokenizer_copied = true;
  } else if (!opts.tokenizer.empty()) {
    throw file_error(opts.tokenizer, "tokenizer model not found");
  } else {
    rep.notes.push_back("tokenizer '" + sp + "' not found: no tokenizer files written (pass --tokenizer)");
  }
  commit_directory_atomic(tmp, out_dir);
  rep.tensors = int64_t(tensors.size());
  return rep;
}

// ================================== import ==================================

ImportReport import_hf(const std::string& hf_dir, const std::string& out_dir, const ImportOptions& opts) {
  const std::string cj_path = hf_dir + "/config.json";
  json hc;
  try {
    hc = json::parse(read_file(cj_path));
  } catch (const json::exception& e) {
    throw file_error(cj_path, std::string("invalid JSON: ") + e.what());
  }
  auto refuse = [&](const std::string& field, const std::string& why) -> Error {
    return file_error(cj_path, "cannot import: " + field + ": " + why);
  };
  ImportReport rep;
  rep.arch = get_or<std::string>(hc, "model_type", "");
  const std::string& arch = rep.arch;
  if (arch != "llama" && arch != "mixtral" && arch != "qwen2_moe") {
    throw refuse("model_type", "'" + arch + "' is not supported (llama | mixtral | qwen2_moe)");
  }

  // Base config: --config, else the moecpt config shipped by `moecpt export`, else defaults.
  Config cfg;
  const std::string shipped = hf_dir + "/moecpt_config.toml";
  if (!opts.base_config.empty()) {
    cfg = load_config(opts.base_config);
  } else if (fs::exists(shipped)) {
    cfg = load_config(shipped);
  } else {
    cfg = parse_config("", "<defaults>");
  }
  ModelConfig& m = cfg.model;
  try {
    m.vocab_size = hc.at("vocab_size").get<int64_t>();
    m.d_model = hc.at("hidden_size").get<int64_t>();
    m.n_layers = hc.at("num_hidden_layers").get<int64_t>();
    m.n_heads = hc.at("num_attention_heads").get<int64_t>();
  } catch (const json::exception& e) {
    throw file_error(cj_path, std::string("missing or invalid field: ") + e.what());
  }
  const int64_t kv_heads = get_or<int64_t>(hc, "num_key_value_heads", m.n_heads);
  if (kv_heads != m.n_heads) {
    throw refuse("num_key_value_heads", "grouped-query attention (" + std::to_string(kv_heads) + " KV heads for " +
                 std::to_string(m.n_heads) + " query heads) is not supported by moecpt's attention");
  }
  if (m.n_heads < 1 || m.d_model % m.n_heads != 0) throw refuse("num_attention_heads", "must divide hidden_size");
  const int64_t head_dim = get_or<int64_t>(hc, "head_dim", m.d_model / m.n_heads);
  if (head_dim != m.d_model / m.n_heads) throw refuse("head_dim", "must equal hidden_size / num_attention_heads");
  if (hc.contains("rope_scaling") && !hc["rope_scaling"].is_null()) throw refuse("rope_scaling", "RoPE scaling is not supported");
  double theta = get_or<double>(hc, "rope_theta", arch == "mixtral" ? 1e6 : 1e4);
  if (hc.contains("rope_parameters") && hc["rope_parameters"].is_object()) {  // transformers >= 5
    const auto& rp = hc["rope_parameters"];
    if (get_or<std::string>(rp, "rope_type", "default") != "default") throw refuse("rope_parameters.rope_type", "only the default RoPE is supported");
    theta = get_or<double>(rp, "rope_theta", theta);
  }
  m.rope_theta = theta;
  m.norm = "rmsnorm";
  m.norm_eps = get_or<double>(hc, "rms_norm_eps", arch == "mixtral" ? 1e-5 : 1e-6);
  m.tie_embeddings = get_or<bool>(hc, "tie_word_embeddings", false);
  m.seq_len = get_or<int64_t>(hc, "max_position_embeddings", m.seq_len);
  const std::string act = get_or<std::string>(hc, "hidden_act", "silu");
  if (act == "silu" || act == "swish") {
    m.activation = "swiglu";
  } else if (act == "gelu") {
    m.activation = "geglu";
  } else {
    throw refuse("hidden_act", "'" + act + "' has no moecpt counterpart (silu → swiglu, gelu (exact erf) → geglu)");
  }
  if (get_or<bool>(hc, "attention_bias", false)) throw refuse("attention_bias", "attention biases are not supported");
  if (get_or<bool>(hc, "mlp_bias", false)) throw refuse("mlp_bias", "MLP biases are not supported");
  const int64_t intermediate = get_or<int64_t>(hc, "intermediate_size", 0);

  std::vector<std::string> files;
  auto hf = load_hf_weights(hf_dir, files);
  const std::string wfile = hf_dir + "/" + (files.size() == 1 ? files[0] : "model.safetensors.index.json");
  bool renorm_from_hf = false;
  if (arch == "llama") {
    m.ffn = "dense";
    m.ffn_hidden = intermediate;
    m.n_experts = 0, m.n_shared_experts = 0, m.top_k = 1, m.expert_hidden = 0, m.moe_every = 1;
  } else if (arch == "mixtral") {
    m.ffn = "moe";
    m.n_experts = get_or<int64_t>(hc, "num_local_experts", 8);
    m.top_k = get_or<int64_t>(hc, "num_experts_per_tok", 2);
    m.expert_hidden = intermediate;
    m.n_shared_experts = 0;
    m.moe_every = 1;
    if (m.top_k == 1) throw refuse("num_experts_per_tok", "Mixtral with top-1 gates every token with weight 1; moecpt's top-1 gate is the softmax probability");
    renorm_from_hf = true;
    if (hc.contains("sliding_window") && !hc["sliding_window"].is_null()) {
      rep.notes.push_back("sliding_window = " + hc["sliding_window"].dump() + " ignored: moecpt attends to the whole sequence (identical while seq_len <= the window)");
    }
  } else {
    m.ffn = "moe";
    m.ffn_hidden = intermediate;
    m.n_experts = get_or<int64_t>(hc, "num_experts", 60);
    m.top_k = get_or<int64_t>(hc, "num_experts_per_tok", 4);
    m.expert_hidden = get_or<int64_t>(hc, "moe_intermediate_size", 1408);
    m.moe_every = get_or<int64_t>(hc, "decoder_sparse_step", 1);
    renorm_from_hf = get_or<bool>(hc, "norm_topk_prob", false);
    if (renorm_from_hf && m.top_k == 1) throw refuse("norm_topk_prob", "true with top-1 gates every token with weight 1; moecpt's top-1 gate is the softmax probability");
    if (hc.contains("mlp_only_layers") && !hc["mlp_only_layers"].empty()) throw refuse("mlp_only_layers", "must be empty (moecpt places MoE blocks by decoder_sparse_step only)");
    if (get_or<bool>(hc, "use_sliding_window", false)) throw refuse("use_sliding_window", "sliding-window attention is not supported");
    // Shared expert: all-zero (our export of S = 0) or a multiple of the expert width.
    const int64_t shared_w = get_or<int64_t>(hc, "shared_expert_intermediate_size", 0);
    const auto layers = model::moe_layer_indices(m);
    bool zero_shared = true;
    for (int64_t l : layers) {
      const std::string sp = "model.layers." + L(l) + ".mlp.shared_expert.";
      for (const char* n : {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}) {
        auto it = hf.find(sp + n);
        if (it != hf.end() && !all_zero(it->second)) zero_shared = false;
      }
    }
    if (zero_shared) {
      m.n_shared_experts = 0;
    } else if (m.expert_hidden > 0 && shared_w % m.expert_hidden == 0) {
      m.n_shared_experts = shared_w / m.expert_hidden;
    } else {
      throw refuse("shared_expert_intermediate_size", std::to_string(shared_w) + " is not a multiple of moe_intermediate_size " +
                   std::to_string(m.expert_hidden) + " (moecpt's shared experts have the routed experts' width)");
    }
  }
  // Router semantics follow the source unless the base config already is the
  // moecpt config of this very model (then it is kept as it was).
  if (m.ffn == "moe" && (opts.base_config.empty() && !fs::exists(shipped))) {
    cfg.router.type = "topk";
    cfg.router.renormalize = renorm_from_hf;
  } else if (m.ffn == "moe") {
    if ((cfg.router.renormalize && m.top_k > 1) != renorm_from_hf) {
      rep.notes.push_back("router.renormalize differs from the source's gate normalisation; set from the source");
      cfg.router.renormalize = renorm_from_hf;
    }
  }
  // Dense parameters in our naming, then the optional upcycling.
  std::map<std::string, torch::Tensor> ours;
  std::set<std::string> used;
  const std::string mapping_arch = arch;
  {
    torch::NoGradGuard no_grad;
    std::map<std::string, std::vector<torch::Tensor>> parts;  // Slice3 / ExpertT pieces in order
    for (const auto& link : mapping(m, mapping_arch)) {
      auto it = hf.find(link.hf);
      if (it == hf.end()) {
        // Qwen2-MoE biases may be absent (qkv_bias = false in newer transformers).
        if (link.op == Op::Zero && link.hf.find(".bias") != std::string::npos) continue;
        throw file_error(wfile, "tensor '" + link.hf + "' is missing");
      }
      used.insert(link.hf);
      auto t = it->second.to(torch::kFloat32);
      if (link.op == Op::Zero) {
        if (!all_zero(t)) {
          throw file_error(wfile, "tensor '" + link.hf + "' is not zero: " +
                           (link.hf.find("shared_expert_gate") != std::string::npos
                                ? std::string("Qwen2-MoE's sigmoid shared-expert gate is token-dependent; moecpt's shared experts are ungated")
                                : std::string("moecpt has no attention biases")));
        }
        continue;
      }
      switch (link.op) {
        case Op::Copy: ours[link.ours] = t; break;
        case Op::Twice: ours[link.ours] = t / 2.0; break;
        case Op::Slice3: parts[link.ours].push_back(t); break;
        case Op::ExpertT: parts[link.ours].push_back(t.t()); break;
        case Op::Zero: break;
      }
    }
    for (auto& [name, ps] : parts) {
      const bool fused_qkv = name.find("attn.qkv") != std::string::npos;
      for (size_t i = 1; i < ps.size(); ++i) {
        if (ps[i].sizes() != ps[0].sizes()) throw file_error(wfile, "pieces of '" + name + "' have different shapes");
      }
      ours[name] = fused_qkv ? torch::cat(ps, 0) : torch::stack(ps, 0);
    }
  }
  for (const auto& [name, t] : hf) {
    if (used.count(name)) continue;
    if (name.find("rotary_emb.inv_freq") != std::string::npos) continue;  // old Llama checkpoints: recomputed
    if (name == "lm_head.weight" && m.tie_embeddings) continue;
    throw file_error(wfile, "unexpected tensor '" + name + "' (not part of a " + arch + " model moecpt can represent)");
  }

  if (opts.upcycle_experts > 0) {
    if (m.ffn != "dense") throw Error("import --upcycle-experts: the source " + hf_dir + " is already an MoE (" + arch + ")");
    if (opts.top_k < 1 || opts.top_k > opts.upcycle_experts) {
      throw Error("import: need 1 <= --top-k (" + std::to_string(opts.top_k) + ") <= --upcycle-experts (" +
                  std::to_string(opts.upcycle_experts) + ")");
    }
    const int64_t E = opts.upcycle_experts;
    m.ffn = "moe";
    m.n_experts = E;
    m.top_k = opts.top_k;
    m.expert_hidden = m.ffn_hidden;
    m.n_shared_experts = 0;
    m.moe_every = 1;
    cfg.router.type = "topk";
    cfg.router.renormalize = opts.renormalize;
    torch::manual_seed(uint64_t(opts.seed));
    for (int64_t l = 0; l < m.n_layers; ++l) {
      const std::string op = "blocks." + L(l) + ".";
      auto w1 = ours.at(op + "mlp.w1.weight"), w3 = ours.at(op + "mlp.w3.weight"), w2 = ours.at(op + "mlp.w2.weight");
      ours.erase(op + "mlp.w1.weight"), ours.erase(op + "mlp.w3.weight"), ours.erase(op + "mlp.w2.weight");
      ours[op + "moe.experts.w1"] = w1.t().unsqueeze(0).expand({E, -1, -1}).contiguous();
      ours[op + "moe.experts.w3"] = w3.t().unsqueeze(0).expand({E, -1, -1}).contiguous();
      ours[op + "moe.experts.w2"] = w2.t().unsqueeze(0).expand({E, -1, -1}).contiguous();
      ours[op + "moe.router.weight"] = torch::randn({E, m.d_model}) * opts.router_init_std;
    }
    rep.upcycled = true;
    rep.notes.push_back("upcycled: every FFN copied into " + std::to_string(E) + " experts, top-" +
                        std::to_string(opts.top_k) + ", router ~ N(0, " + std::to_string(opts.router_init_std) + ")" +
                        (opts.renormalize && opts.top_k > 1 ? ", gates renormalised: output equals the dense model"
                                                            : ", gates not renormalised: FFN output scaled by the gate sum"));
  }

  // Copy the tokenizer next to the checkpoint and point the config at it.
  const bool has_tok = fs::exists(hf_dir + "/tokenizer.model");
  if (has_tok && opts.base_config.empty()) cfg.data.tokenizer = out_dir + "/tokenizer.model";
  // Re-parse so the user's overrides apply last and everything is validated.
  cfg = parse_config(to_toml(cfg), cj_path + " (imported config)", opts.overrides);

  torch::NoGradGuard no_grad;
  model::Transformer net(cfg.model, cfg.router);
  for (auto& [name, dst] : named_tensors(*net)) {
    auto it = ours.find(name);
    if (it == ours.end()) {
      if (name.find("expert_bias") != std::string::npos) {  // aux-loss-free router chosen by --set: starts at 0
        dst.zero_();
        continue;
      }
      throw Error("import: no source tensor for moecpt parameter '" + name + "' (did --set change the model shape?)");
    }
    if (it->second.sizes() != dst.sizes()) {
      std::ostringstream os;
      os << "import: '" << name << "' has shape " << it->second.sizes() << " in " << hf_dir << " but the model expects "
         << dst.sizes() << " (did --set change the model shape?)";
      throw Error(os.str());
    }
    dst.copy_(it->second);
  }
  json state = {{"imported_from", fs::absolute(hf_dir).string()}, {"source_model_type", arch},
                {"upcycled", rep.upcycled}, {"step", 0}};
  save_checkpoint(out_dir, *net, nullptr, state, cfg);
  if (has_tok) {
    fs::copy_file(hf_dir + "/tokenizer.model", out_dir + "/tokenizer.model", fs::copy_options::overwrite_existing);
    rep.tokenizer_copied = true;
  }
  rep.ffn = cfg.model.ffn;
  rep.n_experts = cfg.model.n_experts;
  rep.top_k = cfg.model.top_k;
  rep.n_shared_experts = cfg.model.n_shared_experts;
  return rep;
}

}  // namespace moecpt::hf

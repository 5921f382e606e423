// Every hyper-parameter of a run, as plain structs. Each struct lists its keys
// once, in visit(): that single list drives TOML loading (with type checks and
// unknown-key errors), range validation, and writing the effective config.
// Paper-scale values live in recipes/, never here: defaults are the mini model.
#pragma once
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace moecpt {

// Constraint attached to a numeric key; used by the loader to reject bad values.
struct Range {
  double lo = -std::numeric_limits<double>::infinity();
  double hi = std::numeric_limits<double>::infinity();
  bool lo_open = false;  // true: value must be > lo instead of >= lo
};
inline Range at_least(double lo) { return Range{lo}; }
inline Range positive() { return Range{0.0, std::numeric_limits<double>::infinity(), true}; }
inline Range between(double lo, double hi) { return Range{lo, hi}; }
using Choices = std::vector<std::string>;

struct RunConfig {
  std::string name = "run";
  std::string out_dir = "runs/run";  // outputs: effective config, metrics, checkpoints
  int64_t seed = 1234;
  int64_t threads = 0;               // intra-op threads; 0 = number of cores
  std::string device = "cpu";        // cpu | cuda
  std::string dtype = "float32";     // float32 | bfloat16 (autocast; router stays fp32)
  std::string residual_dtype = "float32";  // the residual stream under bf16 autocast

  template <class V> void visit(V& v) {
    v("name", name, "run name, used in logs and reports");
    v("out_dir", out_dir, "directory for the effective config, metrics and checkpoints");
    v("seed", seed, "seed for initialisation and data order", at_least(0));
    v("threads", threads, "intra-op threads (0 = all cores)", at_least(0));
    v("device", device, "compute device", Choices{"cpu", "cuda"});
    v("dtype", dtype, "compute dtype (router and master weights stay fp32)", Choices{"float32", "bfloat16"});
    v("residual_dtype", residual_dtype,
      "dtype of the residual stream between blocks when dtype = bfloat16 (bfloat16, as Megatron "
      "keeps it, halves the stream's traffic and drops the casts before each matmul)",
      Choices{"float32", "bfloat16"});
  }
};

struct ModelConfig {
  int64_t vocab_size = 8192;
  int64_t d_model = 128;
  int64_t n_layers = 4;
  int64_t n_heads = 4;
  int64_t seq_len = 128;
  int64_t ffn_hidden = 352;           // dense FFN hidden width h
  std::string activation = "geglu";   // gated MLP flavour
  std::string norm = "rmsnorm";
  double norm_eps = 1e-5;
  double rope_theta = 10000.0;
  bool tie_embeddings = false;
  double init_std = 0.02;
  std::string ffn = "dense";          // dense | moe
  int64_t n_experts = 0;              // routed experts E
  int64_t n_shared_experts = 0;       // always-on experts S
  int64_t top_k = 1;                  // k
  int64_t expert_hidden = 0;          // hidden width of one expert (h/m for granular)
  int64_t moe_every = 1;              // every n-th block is MoE (1 = all)

  template <class V> void visit(V& v) {
    v("vocab_size", vocab_size, "vocabulary size (must match the tokenizer)", at_least(2));
    v("d_model", d_model, "model width d", at_least(1));
    v("n_layers", n_layers, "number of transformer blocks L", at_least(1));
    v("n_heads", n_heads, "attention heads (d_model must be divisible by it)", at_least(1));
    v("seq_len", seq_len, "training sequence length", at_least(1));
    v("ffn_hidden", ffn_hidden, "hidden width of the dense gated MLP", at_least(1));
    v("activation", activation, "gated MLP activation", Choices{"geglu", "swiglu"});
    v("norm", norm, "normalisation layer", Choices{"rmsnorm", "layernorm"});
    v("norm_eps", norm_eps, "epsilon of the norm layers", positive());
    v("rope_theta", rope_theta, "RoPE base", positive());
    v("tie_embeddings", tie_embeddings, "share input embedding and output head");
    v("init_std", init_std, "std of the normal weight initialisation", positive());
    v("ffn", ffn, "FFN type of the blocks", Choices{"dense", "moe"});
    v("n_experts", n_experts, "routed experts E (moe only)", at_least(0));
    v("n_shared_experts", n_shared_experts, "always-on shared experts S (moe only)", at_least(0));
    v("top_k", top_k, "experts chosen per token k (moe only)", at_least(1));
    v("expert_hidden", expert_hidden, "hidden width of one expert (moe only)", at_least(0));
    v("moe_every", moe_every, "every n-th block is an MoE block", at_least(1));
  }
};

struct RouterConfig {
  std::string type = "topk";          // topk (Z+Aux) | sinkhorn | bias (aux-loss-free)
  double aux_alpha = 0.01;            // load-balancing loss weight α
  double z_beta = 0.001;              // router z-loss weight β
  bool renormalize = false;           // renormalise the k gates to sum 1
  double sinkhorn_tol = 0.01;
  int64_t sinkhorn_max_iters = 100;
  double bias_gamma = 0.001;          // aux-loss-free bias update speed γ

  template <class V> void visit(V& v) {
    v("type", type, "routing algorithm", Choices{"topk", "sinkhorn", "bias"});
    v("aux_alpha", aux_alpha, "load-balancing loss weight alpha", at_least(0));
    v("z_beta", z_beta, "router z-loss weight beta", at_least(0));
    v("renormalize", renormalize, "renormalise the top-k gates to sum to 1");
    v("sinkhorn_tol", sinkhorn_tol, "Sinkhorn stopping tolerance on mean |d1 - d1_prev|", positive());
    v("sinkhorn_max_iters", sinkhorn_max_iters, "Sinkhorn iteration cap", at_least(1));
    v("bias_gamma", bias_gamma, "aux-loss-free bias step gamma", at_least(0));
  }
};

struct DataConfig {
  std::string tokenizer = "data/tokenizer/moecpt.model";
  std::string shard_dir = "data/shards";         // <shard_dir>/<name>/{train,val}.bin
  std::vector<std::string> train = {"en"};       // new-data datasets of this phase
  std::vector<double> train_weights = {};        // relative weights (empty = equal)
  std::vector<std::string> replay = {};          // replayed old-data datasets (D0)
  double replay_fraction = 0.0;                  // share r of every batch's sequences from `replay`
  std::vector<std::string> validation = {"en"};  // held-out sets evaluated during training

  template <class V> void visit(V& v) {
    v("tokenizer", tokenizer, "sentencepiece model file");
    v("shard_dir", shard_dir, "directory holding <dataset>/{train,val}.bin shards");
    v("train", train, "datasets of this phase (new data)");
    v("train_weights", train_weights, "relative sampling weights of `train` (empty = equal)");
    v("replay", replay, "replay datasets (old data) mixed into every batch");
    v("replay_fraction", replay_fraction, "fraction r of each batch's sequences drawn from `replay`", between(0, 1));
    v("validation", validation, "held-out datasets evaluated during training");
  }
};

struct OptimConfig {
  double lr = 3e-4;          // η_max
  double min_lr = 3e-5;      // η_min
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
  double grad_clip = 1.0;    // global grad-norm clip (0 = off)

  template <class V> void visit(V& v) {
    v("lr", lr, "peak learning rate eta_max", positive());
    v("min_lr", min_lr, "final learning rate eta_min", at_least(0));
    v("beta1", beta1, "AdamW beta1", between(0, 1));
    v("beta2", beta2, "AdamW beta2", between(0, 1));
    v("eps", eps, "AdamW epsilon", positive());
    v("weight_decay", weight_decay, "decoupled weight decay (not on norms/embeddings)", at_least(0));
    v("grad_clip", grad_clip, "global gradient-norm clip (0 = off)", at_least(0));
  }
};

struct ScheduleConfig {
  std::string type = "cosine";       // cosine | constant | infinite | wsd
  double warmup_fraction = 0.01;     // of the phase's steps
  std::string warmup_from = "zero";  // zero | min_lr (re-warming for CPT)
  // infinite ("CosineInf"): warmup → cooldown to const_lr → constant → anneal to min_lr
  double const_lr = 1.65e-4;             // η_const
  double cooldown_end_fraction = 0.6;    // the cooldown ends here (fraction of the phase)
  std::string cooldown_shape = "cosine"; // cosine | inv_sqrt
  double inv_sqrt_alpha = 10.0;          // shape of the inverse-sqrt cooldown
  double anneal_fraction = 0.15;         // final exponential anneal (0 = none in this phase)
  std::string start = "warmup";          // warmup | constant (CPT from a pre-anneal checkpoint)
  // wsd: warmup → stable at lr → decay to min_lr
  double decay_fraction = 0.2;
  std::string decay_shape = "linear";    // linear | sqrt (1 − sqrt)

  template <class V> void visit(V& v) {
    v("type", type, "learning-rate schedule", Choices{"cosine", "constant", "infinite", "wsd"});
    v("warmup_fraction", warmup_fraction, "linear warmup length as a fraction of the phase", between(0, 1));
    v("warmup_from", warmup_from, "warmup start: 0 (pre-training) or min_lr (re-warming in CPT)", Choices{"zero", "min_lr"});
    v("const_lr", const_lr, "infinite: constant learning rate eta_const", positive());
    v("cooldown_end_fraction", cooldown_end_fraction, "infinite: end of the cooldown to const_lr (fraction of the phase)", between(0, 1));
    v("cooldown_shape", cooldown_shape, "infinite: shape of the cooldown", Choices{"cosine", "inv_sqrt"});
    v("inv_sqrt_alpha", inv_sqrt_alpha, "infinite: shape alpha of the inverse-sqrt cooldown", positive());
    v("anneal_fraction", anneal_fraction, "infinite: final exponential anneal to min_lr (fraction of the phase)", between(0, 1));
    v("start", start, "infinite: 'warmup' (pre-training) or 'constant' (CPT from the pre-anneal checkpoint)", Choices{"warmup", "constant"});
    v("decay_fraction", decay_fraction, "wsd: final decay length (fraction of the phase)", between(0, 1));
    v("decay_shape", decay_shape, "wsd: decay shape", Choices{"linear", "sqrt"});
  }
};

struct TrainConfig {
  int64_t steps = 200;
  int64_t batch_size = 16;         // sequences per optimizer step
  int64_t micro_batch_size = 0;    // sequences per forward/backward (0 = batch_size)
  std::string init_from = "";      // checkpoint directory to start from (CPT)
  bool init_optimizer = false;     // also load the optimizer state of init_from
  int64_t log_every = 10;
  int64_t eval_every = 50;         // 0 = only at the end
  int64_t eval_batches = 8;        // validation batches per dataset per evaluation
  int64_t checkpoint_every = 0;    // 0 = only at the end
  int64_t keep_last = 2;           // step checkpoints kept (tagged ones are always kept)
  std::string on_nonfinite = "stop";  // stop | skip
  std::string activation_checkpointing = "none";  // none | full (model/activation_checkpoint.h)
  int64_t activation_checkpointing_every = 1;    // full: recompute blocks l with l % n == 0
  bool cuda_graph = false;         // replay each micro-batch as a CUDA graph (train/cuda_graph.h)

  // For TransformerImpl::set_activation_checkpointing: 0 = off, else n.
  int64_t recompute_every() const { return activation_checkpointing == "full" ? activation_checkpointing_every : 0; }

  template <class V> void visit(V& v) {
    v("steps", steps, "optimizer steps in this phase", at_least(1));
    v("batch_size", batch_size, "sequences per optimizer step", at_least(1));
    v("micro_batch_size", micro_batch_size, "sequences per forward/backward, global under data parallel (each of W ranks runs 1/W of it); gradients accumulate (0 = batch_size)", at_least(0));
    v("init_from", init_from, "checkpoint to initialise from (continual pre-training)");
    v("init_optimizer", init_optimizer, "also load the AdamW state of init_from");
    v("log_every", log_every, "steps between progress lines", at_least(1));
    v("eval_every", eval_every, "steps between validation passes (0 = end only)", at_least(0));
    v("eval_batches", eval_batches, "validation batches per dataset", at_least(1));
    v("checkpoint_every", checkpoint_every, "steps between checkpoints (0 = end only)", at_least(0));
    v("keep_last", keep_last, "step checkpoints to keep (final and pre_anneal are always kept)", at_least(1));
    v("on_nonfinite", on_nonfinite, "non-finite loss: stop the run, or skip the batch", Choices{"stop", "skip"});
    v("activation_checkpointing", activation_checkpointing, "recompute blocks in the backward instead of keeping their activations (less memory, ~1/3 more FLOPs; same gradients)", Choices{"none", "full"});
    v("activation_checkpointing_every", activation_checkpointing_every, "with full: recompute every n-th block (1 = all, 2 = every other one)", at_least(1));
    v("cuda_graph", cuda_graph, "replay each micro-batch's forward + backward as a CUDA graph after two eager ones (one process, run.device = cuda, grouped expert GEMM; Sinkhorn needs MOECPT_SINKHORN_KERNEL=1)");
  }
};

// Multi-process layout (docs/distributed.md); does not change what is trained.
struct ParallelConfig {
  int64_t expert_parallel = 1;  // ranks that share one copy of the routed experts (1 = each rank has all)

  template <class V> void visit(V& v) {
    v("expert_parallel", expert_parallel, "expert parallel: routed experts sharded over this many ranks (divides WORLD_SIZE and model.n_experts; 1 = off)", at_least(1));
  }
};

struct Config {
  RunConfig run;
  ModelConfig model;
  RouterConfig router;
  DataConfig data;
  OptimConfig optim;
  ScheduleConfig schedule;
  TrainConfig train;
  ParallelConfig parallel;

  template <class V> void visit(V& v) {
    v.section("run", run);
    v.section("model", model);
    v.section("router", router);
    v.section("data", data);
    v.section("optim", optim);
    v.section("schedule", schedule);
    v.section("train", train);
    v.section("parallel", parallel);
  }
};

// Data preparation (`moecpt data tokenizer train`, `moecpt data prepare`).
struct TokenizerConfig {
  std::string model = "data/tokenizer/moecpt.model";
  int64_t vocab_size = 8192;
  std::string model_type = "bpe";
  double character_coverage = 0.9995;
  int64_t max_sentences = 300000;   // sentencepiece input_sentence_size
  int64_t max_sentence_bytes = 4096;

  template <class V> void visit(V& v) {
    v("model", model, "sentencepiece model file (written by `data tokenizer train`)");
    v("vocab_size", vocab_size, "vocabulary size", at_least(64));
    v("model_type", model_type, "sentencepiece algorithm", Choices{"bpe", "unigram"});
    v("character_coverage", character_coverage, "share of characters covered without byte fallback", between(0.9, 1));
    v("max_sentences", max_sentences, "training lines sampled from the corpora", at_least(1000));
    v("max_sentence_bytes", max_sentence_bytes, "longest training line in bytes", at_least(64));
  }
};

struct CorporaConfig {
  std::vector<std::string> names = {"en", "de", "code"};
  std::vector<std::string> inputs = {"data/corpora/en.jsonl", "data/corpora/de.jsonl", "data/corpora/code.jsonl"};
  std::string shard_dir = "data/shards";
  double val_fraction = 0.1;
  int64_t seed = 0;
  int64_t threads = 0;

  template <class V> void visit(V& v) {
    v("names", names, "dataset names (shards go to <shard_dir>/<name>/{train,val}.bin)");
    v("inputs", inputs, "JSONL corpus per name ({\"id\", \"text\"} per line)");
    v("shard_dir", shard_dir, "output directory of the shards");
    v("val_fraction", val_fraction, "share of documents held out for validation", between(0, 0.5));
    v("seed", seed, "seed of the document split", at_least(0));
    v("threads", threads, "tokenizer threads (0 = all cores)", at_least(0));
  }
};

struct DataPrepConfig {
  TokenizerConfig tokenizer;
  CorporaConfig corpora;

  template <class V> void visit(V& v) {
    v.section("tokenizer", tokenizer);
    v.section("corpora", corpora);
  }
};

// Load `path` (TOML), apply `overrides` ("section.key=value", value in TOML
// syntax; bare words are strings), validate, and return the config.
// Throws moecpt::Error naming the file and key on any problem.
Config load_config(const std::string& path, const std::vector<std::string>& overrides = {});
// Same, from TOML text (for tests); `origin` names the source in errors.
Config parse_config(const std::string& toml_text, const std::string& origin,
                    const std::vector<std::string>& overrides = {});
DataPrepConfig load_data_prep_config(const std::string& path, const std::vector<std::string>& overrides = {});
std::string to_toml(const DataPrepConfig& cfg);
// Cross-field checks (top_k <= n_experts, heads divide d_model, ...).
void validate(const Config& cfg, const std::string& origin);
// The complete effective config as TOML text (every key, defaults included).
std::string to_toml(const Config& cfg);
// Write it atomically to `path`.
void write_effective_config(const Config& cfg, const std::string& path);

}  // namespace moecpt

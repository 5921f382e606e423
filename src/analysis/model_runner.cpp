#include "analysis/model_runner.h"

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "core/error.h"
#include "data/shard.h"
#include "train/checkpoint.h"

namespace moecpt::analysis {
namespace fs = std::filesystem;

LoadedModel load_model(const std::string& checkpoint_dir, const std::string& device) {
  const fs::path dir(checkpoint_dir);
  if (!fs::is_directory(dir)) throw file_error(checkpoint_dir, "checkpoint directory does not exist");
  for (const char* f : {"config.toml", "model.safetensors"})
    if (!fs::exists(dir / f))
      throw file_error((dir / f).string(), "missing: a checkpoint directory holds model.safetensors and config.toml");
  if (device == "cuda" && !torch::cuda::is_available())
    throw Error("--device cuda: this build/machine has no CUDA device");
  LoadedModel m;
  m.dir = checkpoint_dir;
  m.cfg = load_config((dir / "config.toml").string());
  m.device = device == "cuda" ? torch::Device(torch::kCUDA) : torch::Device(torch::kCPU);
  m.model = model::Transformer(m.cfg.model, m.cfg.router);
  load_model_weights(checkpoint_dir, *m.model);
  m.model->to(m.device);
  m.model->eval();
  if (fs::exists(dir / "trainer.json")) m.step = load_trainer_state(checkpoint_dir).value("step", int64_t(-1));
  return m;
}

ResolvedDataset resolve_dataset(const std::string& dataset, const std::string& shard_dir) {
  ResolvedDataset r;
  const fs::path p(dataset);
  if (p.extension() == ".bin" || fs::is_regular_file(p)) {
    r.path = dataset;
    r.name = p.parent_path().filename().string();
    if (r.name.empty()) r.name = p.stem().string();
  } else {
    r.name = dataset;
    r.path = (fs::path(shard_dir) / dataset / "val.bin").string();
  }
  if (!fs::exists(r.path)) throw file_error(r.path, "validation shard of dataset '" + dataset + "' does not exist");
  return r;
}

int64_t for_each_batch(const Shard& shard, int64_t seq_len, int64_t batch_size, int64_t max_tokens,
                       const BatchFn& fn) {
  // Windows of seq+1 tokens at stride seq, as the trainer's evaluation: every
  // token after the first is a target exactly once.
  const uint64_t n = shard.size();
  const uint64_t windows = n > uint64_t(seq_len) ? (n - 1) / uint64_t(seq_len) : 0;
  if (windows == 0)
    throw file_error(shard.path(), "too small for one window of " + std::to_string(seq_len + 1) + " tokens");
  uint64_t max_windows = windows;
  if (max_tokens > 0) max_windows = std::min<uint64_t>(windows, std::max<uint64_t>(1, uint64_t(max_tokens) / uint64_t(seq_len)));
  int64_t looked_at = 0;
  std::vector<int64_t> buf;
  for (uint64_t w = 0; w < max_windows;) {
    const int64_t B = int64_t(std::min<uint64_t>(uint64_t(batch_size), max_windows - w));
    buf.resize(size_t(B * (seq_len + 1)));
    for (int64_t r = 0; r < B; ++r, ++w) shard.copy(w * uint64_t(seq_len), uint64_t(seq_len) + 1, buf.data() + r * (seq_len + 1));
    fn(torch::from_blob(buf.data(), {B, seq_len + 1}, torch::kInt64));
    looked_at += B * seq_len;
  }
  return looked_at;
}

BatchResult forward_batch(LoadedModel& m, const torch::Tensor& tokens_BT1) {
  torch::NoGradGuard no_grad;
  const int64_t T = tokens_BT1.size(1) - 1;
  auto windows = tokens_BT1.to(m.device);
  auto inputs_BT = windows.narrow(1, 0, T);
  auto targets_BT = windows.narrow(1, 1, T);
  auto out = m.model->forward(inputs_BT);
  const int64_t V = out.logits_BTV.size(-1);
  auto ce = torch::nn::functional::cross_entropy(
      out.logits_BTV.reshape({-1, V}).to(torch::kFloat32), targets_BT.reshape({-1}),
      torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
  BatchResult r;
  r.loss_sum = ce.item<double>();
  r.tokens = inputs_BT.numel();
  r.input_ids_T = inputs_BT.reshape({-1}).to(torch::kCPU);
  r.routing = std::move(out.routing);
  return r;
}

int64_t effective_batch_size(const LoadedModel& m, const DataOptions& opt) {
  if (opt.batch_size > 0) return opt.batch_size;
  return m.cfg.train.micro_batch_size > 0 ? m.cfg.train.micro_batch_size : m.cfg.train.batch_size;
}
int64_t effective_seq_len(const LoadedModel& m, const DataOptions& opt) {
  return opt.seq_len > 0 ? opt.seq_len : m.cfg.model.seq_len;
}

LossResult evaluate_loss(LoadedModel& m, const std::string& shard_path, const DataOptions& opt) {
  auto shard = Shard::open(shard_path);
  if (int64_t(shard->info().vocab_size) > m.cfg.model.vocab_size)
    throw file_error(shard_path, "shard vocabulary (" + std::to_string(shard->info().vocab_size) +
                                     ") is larger than the model's (" + std::to_string(m.cfg.model.vocab_size) + ")");
  double loss_sum = 0;
  LossResult r;
  r.tokens = for_each_batch(*shard, effective_seq_len(m, opt), effective_batch_size(m, opt), opt.max_tokens,
                            [&](const torch::Tensor& w) { loss_sum += forward_batch(m, w).loss_sum; });
  r.loss = loss_sum / double(std::max<int64_t>(1, r.tokens));
  r.ppl = std::exp(r.loss);
  return r;
}

}  // namespace moecpt::analysis

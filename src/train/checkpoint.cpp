#include "train/checkpoint.h"

#include <filesystem>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/safetensors.h"

namespace moecpt {
namespace fs = std::filesystem;

void save_checkpoint(const std::string& dir, torch::nn::Module& model, torch::optim::Optimizer* optimizer,
                     const nlohmann::json& trainer_state, const Config& cfg) {
  const std::string tmp = dir + ".tmp";
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (const auto& p : model.named_parameters()) tensors.emplace_back(p.key(), p.value().detach());
  for (const auto& b : model.named_buffers()) tensors.emplace_back(b.key(), b.value().detach());
  save_safetensors(tmp + "/model.safetensors", tensors, {{"format", "moecpt"}});
  if (optimizer) torch::save(*optimizer, tmp + "/optimizer.pt");
  write_file_atomic(tmp + "/trainer.json", trainer_state.dump(2) + "\n");
  write_effective_config(cfg, tmp + "/config.toml");
  commit_directory_atomic(tmp, dir);
}

void load_model_weights(const std::string& dir, torch::nn::Module& model) {
  const std::string path = dir + "/model.safetensors";
  if (!fs::exists(path)) throw file_error(path, "checkpoint weights not found");
  auto file = load_safetensors(path);
  torch::NoGradGuard no_grad;
  auto assign = [&](const std::string& name, torch::Tensor& dst) {
    auto it = file.tensors.find(name);
    if (it == file.tensors.end()) throw file_error(path, "tensor '" + name + "' is missing (different model config?)");
    check_tensor_matches(path, name, it->second, dst.sizes(), dst.scalar_type());
    dst.copy_(it->second);
  };
  for (auto& p : model.named_parameters()) assign(p.key(), p.value());
  for (auto& b : model.named_buffers()) assign(b.key(), b.value());
}

void load_optimizer_state(const std::string& dir, torch::optim::Optimizer& optimizer) {
  const std::string path = dir + "/optimizer.pt";
  if (!fs::exists(path)) throw file_error(path, "optimizer state not found");
  try {
    torch::load(optimizer, path);
  } catch (const c10::Error& e) {
    throw file_error(path, std::string("cannot load optimizer state: ") + e.what_without_backtrace());
  }
}

nlohmann::json load_trainer_state(const std::string& dir) {
  const std::string path = dir + "/trainer.json";
  try {
    return nlohmann::json::parse(read_file(path));
  } catch (const nlohmann::json::exception& e) {
    throw file_error(path, std::string("invalid trainer state: ") + e.what());
  }
}

}  // namespace moecpt

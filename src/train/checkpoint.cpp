#include "train/checkpoint.h"

#include <filesystem>
#include <sstream>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/safetensors.h"
#include "data/mixture.h"
#include "data/shard.h"

namespace moecpt {
namespace fs = std::filesystem;

namespace {

constexpr const char* kWeightsChecksumKey = "fnv1a64";  // of the tensors' bytes, in file order

std::string hex64(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

uint64_t tensors_checksum(const std::vector<torch::Tensor>& tensors) {
  uint64_t h = fnv1a64(nullptr, 0);
  for (const auto& t : tensors) h = fnv1a64(t.data_ptr(), size_t(t.numel()) * t.element_size(), h);
  return h;
}

// Leftovers of a checkpoint write that was killed: "<name>.tmp" directories
// (never resumed from) and "<name>.old.<pid>" copies. Removed best effort.
void remove_stale_siblings(const fs::path& parent) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(parent, ec)) {
    const std::string name = e.path().filename().string();
    const bool stale = name.ends_with(".tmp") || name.find(".old.") != std::string::npos;
    if (stale && e.is_directory(ec)) fs::remove_all(e.path(), ec);
  }
}

}  // namespace

void save_checkpoint(const std::string& dir, torch::nn::Module& model, torch::optim::Optimizer* optimizer,
                     const nlohmann::json& trainer_state, const Config& cfg) {
  const std::string tmp = dir + ".tmp";
  std::error_code ec;
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  if (ec) throw file_error(tmp, "cannot create the checkpoint directory: " + ec.message());
  try {
    std::vector<std::pair<std::string, torch::Tensor>> tensors;
    for (const auto& p : model.named_parameters())
      tensors.emplace_back(p.key(), p.value().detach().to(torch::kCPU).contiguous());
    for (const auto& b : model.named_buffers())
      tensors.emplace_back(b.key(), b.value().detach().to(torch::kCPU).contiguous());
    std::vector<torch::Tensor> data;
    for (const auto& [name, t] : tensors) data.push_back(t);
    save_safetensors(tmp + "/model.safetensors", tensors,
                     {{"format", "moecpt"}, {kWeightsChecksumKey, hex64(tensors_checksum(data))}});
    if (optimizer) {
      // Serialised in memory, then written like every other file: a full disk
      // is reported with the OS reason instead of a torn archive.
      std::ostringstream os;
      torch::save(*optimizer, os);
      write_file_atomic(tmp + "/optimizer.pt", os.str());
    }
    write_file_atomic(tmp + "/trainer.json", trainer_state.dump(2) + "\n");
    write_effective_config(cfg, tmp + "/config.toml");
    commit_directory_atomic(tmp, dir);
  } catch (...) {
    fs::remove_all(tmp, ec);  // the previous checkpoint `dir`, if any, is untouched
    throw;
  }
  remove_stale_siblings(fs::path(dir).parent_path());
}

void remove_checkpoint(const std::string& dir) {
  // Rename first (atomic), then delete: a kill during the deletion leaves a
  // "<dir>.tmp" leftover, never a half-deleted checkpoint under its real name.
  std::string clean = dir;
  while (clean.size() > 1 && clean.back() == '/') clean.pop_back();
  const std::string trash = clean + ".tmp";
  std::error_code ec;
  fs::remove_all(trash, ec);
  fs::rename(clean, trash, ec);
  if (ec) throw file_error(dir, "cannot remove old checkpoint: " + ec.message());
  fs::remove_all(trash, ec);
  if (ec) throw file_error(trash, "cannot remove old checkpoint: " + ec.message());
}

void load_model_weights(const std::string& dir, torch::nn::Module& model) {
  const std::string path = dir + "/model.safetensors";
  if (!fs::exists(path)) throw file_error(path, "checkpoint weights not found");
  auto file = load_safetensors(path);
  // Weights written by moecpt carry a checksum of their bytes: a flipped bit
  // on disk is an error, not a silently different model.
  if (auto it = file.metadata.find(kWeightsChecksumKey); it != file.metadata.end()) {
    std::vector<torch::Tensor> data;
    for (const auto& name : file.order) data.push_back(file.tensors.at(name));
    const std::string got = hex64(tensors_checksum(data));
    if (got != it->second)
      throw file_error(path, "checksum mismatch: the weights are corrupted (metadata '" +
                                 std::string(kWeightsChecksumKey) + "' is " + it->second + ", the data hashes to " +
                                 got + ")");
  }
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
    throw file_error(path, std::string("cannot load optimizer state (truncated or corrupted?): ") +
                               e.what_without_backtrace());
  } catch (const std::exception& e) {
    throw file_error(path, std::string("cannot load optimizer state (truncated or corrupted?): ") + e.what());
  }
}

nlohmann::json load_trainer_state(const std::string& dir) {
  const std::string path = dir + "/trainer.json";
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_file(path));
  } catch (const nlohmann::json::exception& e) {
    throw file_error(path, std::string("invalid trainer state (truncated or corrupted?): ") + e.what());
  }
  // Check every field the trainer reads, so that a damaged file is named here
  // instead of surfacing as a bare JSON exception later.
  auto bad = [&](const std::string& field, const std::string& what) {
    return file_error(path, "invalid trainer state: field '" + field + "' " + what);
  };
  if (!j.is_object()) throw file_error(path, "invalid trainer state: expected a JSON object");
  if (!j.contains("step") || !j["step"].is_number_integer() || j["step"].get<int64_t>() < 0)
    throw bad("step", "must be a non-negative integer");
  if (!j.contains("sampler") || !j["sampler"].is_object()) throw bad("sampler", "must be an object");
  try {
    (void)sampler_state_from_json(j["sampler"]);
  } catch (const nlohmann::json::exception& e) {
    throw bad("sampler", std::string("is malformed: ") + e.what());
  }
  if (j.contains("initial_eval")) {
    const auto& ie = j["initial_eval"];
    bool ok = ie.is_object();
    for (auto it = ie.begin(); ok && it != ie.end(); ++it)
      ok = it->is_object() && it->contains("loss") && (*it)["loss"].is_number() && it->contains("tokens") &&
           (*it)["tokens"].is_number_integer() && it->contains("mri") && (*it)["mri"].is_array();
    if (!ok) throw bad("initial_eval", "is malformed");
  }
  return j;
}

}  // namespace moecpt

// Checkpoints are directories, written to `<dir>.tmp` and renamed into place
// (atomically, also over an existing checkpoint), so a checkpoint directory is
// complete or absent, whenever the process dies. "*.tmp" leftovers are never
// resumed from and are removed by the next save_checkpoint().
//   model.safetensors   weights (names = the module's parameter/buffer names;
//                       metadata "fnv1a64" = checksum of the tensor bytes, verified on load)
//   optimizer.pt        AdamW state (LibTorch archive)
//   trainer.json        step, phase, sampler state, RNG seed material
//   config.toml         the effective config of the run that wrote it
#pragma once
#include <nlohmann/json.hpp>
#include <string>

#include "core/config.h"
#include "core/pch.h"

namespace moecpt {

void save_checkpoint(const std::string& dir, torch::nn::Module& model, torch::optim::Optimizer* optimizer,
                     const nlohmann::json& trainer_state, const Config& cfg);

// Delete a checkpoint directory so that a crash midway never leaves a
// half-deleted checkpoint under its name (it is renamed to "<dir>.tmp" first).
void remove_checkpoint(const std::string& dir);

// Load weights into `model`; every parameter and buffer must be present with
// the right shape (errors name the checkpoint file and the tensor).
void load_model_weights(const std::string& dir, torch::nn::Module& model);
void load_optimizer_state(const std::string& dir, torch::optim::Optimizer& optimizer);
nlohmann::json load_trainer_state(const std::string& dir);

}  // namespace moecpt

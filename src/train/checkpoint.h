// Checkpoints are directories, written to `<dir>.tmp` and renamed into place:
//   model.safetensors   weights (names = the module's parameter/buffer names)
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

// Load weights into `model`; every parameter and buffer must be present with
// the right shape (errors name the checkpoint file and the tensor).
void load_model_weights(const std::string& dir, torch::nn::Module& model);
void load_optimizer_state(const std::string& dir, torch::optim::Optimizer& optimizer);
nlohmann::json load_trainer_state(const std::string& dir);

}  // namespace moecpt

// `moecpt export --checkpoint C --format hf --out DIR [--arch A] [--tokenizer M]`:
// a moecpt checkpoint as a Hugging Face `transformers` model directory
// (model/hf_interop.h, docs/interop.md).
#include <cstdio>
#include <memory>

#include "cli/commands.h"
#include "core/error.h"
#include "model/hf_interop.h"

namespace moecpt::cli {

void register_export_commands(CLI::App& app) {
  auto* cmd = app.add_subcommand("export", "Export a checkpoint to another format (hf: transformers Llama / Mixtral / Qwen2-MoE)");
  auto ckpt = std::make_shared<std::string>();
  auto format = std::make_shared<std::string>("hf");
  auto out = std::make_shared<std::string>();
  auto opts = std::make_shared<hf::ExportOptions>();
  cmd->add_option("--checkpoint", *ckpt, "checkpoint directory (model.safetensors + config.toml)")->required();
  cmd->add_option("--format", *format, "output format (only 'hf')")->check(CLI::IsMember({"hf"}));
  cmd->add_option("--out", *out, "output directory (replaced atomically)")->required();
  cmd->add_option("--arch", opts->arch, "auto | llama | mixtral | qwen2_moe (auto picks the exact match)");
  cmd->add_option("--tokenizer", opts->tokenizer, "sentencepiece model to ship (default: data.tokenizer of the checkpoint)");
  cmd->callback([=] {
    auto rep = hf::export_hf(*ckpt, *out, *opts);
    std::printf("exported %s as %s: %lld tensors%s -> %s\n", ckpt->c_str(), rep.arch.c_str(),
                (long long)rep.tensors, rep.tokenizer_copied ? " + tokenizer" : "", out->c_str());
    for (const auto& n : rep.notes) std::printf("note: %s\n", n.c_str());
  });
}

}  // namespace moecpt::cli

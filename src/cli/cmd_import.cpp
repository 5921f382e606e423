// `moecpt import --from DIR --out C [--config R] [--set k=v] [--upcycle-experts E --top-k K]`:
// a Hugging Face Llama / Mixtral / Qwen2-MoE directory as a moecpt checkpoint
// for `train.init_from` (continual pre-training of someone else's model), with
// optional sparse upcycling of a dense model (model/hf_interop.h, docs/interop.md).
#include <cstdio>
#include <memory>

#include "cli/commands.h"
#include "core/error.h"
#include "model/hf_interop.h"

namespace moecpt::cli {

void register_import_commands(CLI::App& app) {
  auto* cmd = app.add_subcommand("import", "Import a Hugging Face model directory as a checkpoint (optionally upcycled to an MoE)");
  auto from = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  auto opts = std::make_shared<hf::ImportOptions>();
  auto no_renorm = std::make_shared<bool>(false);
  cmd->add_option("--from", *from, "Hugging Face directory (config.json + safetensors)")->required();
  cmd->add_option("--out", *out, "checkpoint directory to write")->required();
  cmd->add_option("--config,-c", opts->base_config, "recipe whose run/data/optim/... sections the checkpoint's config.toml takes");
  cmd->add_option("--set", opts->overrides, "override a key of the resulting config: section.key=value (repeatable)");
  cmd->add_option("--upcycle-experts", opts->upcycle_experts, "sparse upcycling: copy each dense FFN into this many experts");
  cmd->add_option("--top-k", opts->top_k, "upcycling: experts per token (default 2)");
  cmd->add_option("--router-init-std", opts->router_init_std, "upcycling: std of the new router weights (default 0.02)");
  cmd->add_option("--seed", opts->seed, "upcycling: seed of the router initialisation (default 0)");
  cmd->add_flag("--no-renormalize", *no_renorm, "upcycling: do not renormalise the top-k gates (output then differs from the dense model)");
  cmd->callback([=] {
    opts->renormalize = !*no_renorm;
    auto rep = hf::import_hf(*from, *out, *opts);
    std::printf("imported %s (%s) -> %s: %s", from->c_str(), rep.arch.c_str(), out->c_str(), rep.ffn.c_str());
    if (rep.ffn == "moe") {
      std::printf(", %lld experts, top-%lld, %lld shared", (long long)rep.n_experts, (long long)rep.top_k,
                  (long long)rep.n_shared_experts);
    }
    std::printf("%s\n", rep.tokenizer_copied ? ", tokenizer copied" : "");
    for (const auto& n : rep.notes) std::printf("note: %s\n", n.c_str());
    std::printf("continue pre-training with: moecpt train --config <recipe> --init-from %s\n", out->c_str());
  });
}

}  // namespace moecpt::cli

#include <chrono>
#include <iostream>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/config.h"
#include "core/log.h"
#include "data/documents.h"
#include "data/prepare.h"
#include "data/shard.h"
#include "data/tokenizer.h"

namespace moecpt::cli {

void register_data_commands(CLI::App& app) {
  auto* data = app.add_subcommand("data", "Tokenizer training, shard preparation and inspection");
  data->require_subcommand(1);

  auto path = std::make_shared<std::string>("recipes/data/corpora.toml");
  auto sets = std::make_shared<std::vector<std::string>>();

  auto* tok = data->add_subcommand("tokenizer", "Tokenizer commands");
  tok->require_subcommand(1);
  auto* tok_train = tok->add_subcommand("train", "Train the sentencepiece tokenizer on all corpora");
  tok_train->add_option("--config,-c", *path, "data recipe (TOML)")->capture_default_str();
  tok_train->add_option("--set", *sets, "override a key: section.key=value");
  tok_train->callback([=] {
    auto cfg = load_data_prep_config(*path, *sets);
    std::vector<std::vector<Document>> corpora;
    for (const auto& in : cfg.corpora.inputs) corpora.push_back(read_documents(in));
    auto r = train_tokenizer(cfg.tokenizer, corpora);
    Tokenizer t(cfg.tokenizer.model);
    log::info("tokenizer " + cfg.tokenizer.model + ": vocab " + std::to_string(t.vocab_size()) + ", trained on " +
              std::to_string(r.sentences) + " text chunks in " + std::to_string(r.seconds).substr(0, 5) + " s");
  });

  auto* prep = data->add_subcommand("prepare", "Tokenize every corpus into train/val shards");
  prep->add_option("--config,-c", *path, "data recipe (TOML)")->capture_default_str();
  prep->add_option("--set", *sets, "override a key: section.key=value");
  prep->callback([=] {
    auto cfg = load_data_prep_config(*path, *sets);
    auto stats = prepare_corpora(cfg);
    nlohmann::json j = nlohmann::json::array();
    for (const auto& s : stats)
      j.push_back({{"name", s.name},
                   {"train_tokens", s.train.tokens},
                   {"val_tokens", s.val.tokens},
                   {"train_documents", s.train.documents},
                   {"val_documents", s.val.documents},
                   {"seconds", s.seconds}});
    std::cout << j.dump(2) << "\n";
  });

  auto* inspect = data->add_subcommand("inspect", "Validate a shard and print its statistics as JSON");
  auto shard_path = std::make_shared<std::string>();
  auto no_verify = std::make_shared<bool>(false);
  inspect->add_option("path", *shard_path, "shard file (.bin)")->required();
  inspect->add_flag("--no-verify", *no_verify, "skip the checksum and token-range pass");
  inspect->callback([=] {
    auto shard = Shard::open(*shard_path, !*no_verify);
    const auto& i = shard->info();
    uint64_t longest = 0;
    for (uint64_t d = 0; d < i.n_docs; ++d) {
      auto [a, b] = shard->document(d);
      longest = std::max(longest, b - a);
    }
    nlohmann::json j = {{"path", *shard_path},       {"version", i.version},
                        {"tokens", i.n_tokens},      {"documents", i.n_docs},
                        {"vocab_size", i.vocab_size}, {"token_bytes", i.token_bytes},
                        {"checksum", i.checksum},     {"verified", !*no_verify},
                        {"longest_document_tokens", longest}};
    std::cout << j.dump(2) << "\n";
  });
}

}  // namespace moecpt::cli

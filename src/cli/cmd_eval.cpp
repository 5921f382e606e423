// `moecpt eval`: zero-shot multiple-choice accuracy of a checkpoint on a JSONL
// task; `moecpt eval make-tasks`: the shipped held-out tasks (docs/analysis.md).
#include <iostream>
#include <memory>

#include "analysis/tasks.h"
#include "cli/commands.h"
#include "core/log.h"

namespace moecpt::cli {

void register_eval_commands(CLI::App& app) {
  auto o = std::make_shared<analysis::EvalOptions>();
  auto as_json = std::make_shared<bool>(false);
  auto* ev = app.add_subcommand("eval", "Zero-shot multiple-choice accuracy (acc, acc_norm) on a JSONL task file");
  ev->add_option("--checkpoint", o->checkpoint, "checkpoint directory");
  ev->add_option("--task", o->task, "task file: one {\"context\", \"choices\", \"label\", \"id\"?} per line");
  ev->add_option("--tokenizer", o->tokenizer, "sentencepiece model (default: the checkpoint's data.tokenizer)");
  ev->add_option("--batch-size", o->batch_size, "sequences (item × choice) per forward");
  ev->add_option("--device", o->device, "cpu | cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  ev->add_flag("--details", o->details, "include each item's log-likelihoods and predictions (JSON)");
  ev->add_flag("--json", *as_json, "print the JSON report");

  auto mo = std::make_shared<analysis::MakeTasksOptions>();
  auto config = std::make_shared<std::string>();
  auto sets = std::make_shared<std::vector<std::string>>();
  auto* mk = ev->add_subcommand("make-tasks", "Build continuation and cloze tasks from the held-out documents of each corpus");
  mk->add_option("--config,-c", *config, "data recipe (its [corpora]: names, inputs, val_fraction, seed)")->required();
  mk->add_option("--set", *sets, "override a key: section.key=value (repeatable)");
  mk->add_option("--out", mo->out_dir, "output directory");
  mk->add_option("--max-items", mo->max_items, "items per file at most");
  mk->add_option("--choices", mo->n_choices, "choices per item");
  mk->add_option("--seed", mo->seed, "seed of the item subsample and distractors");
  mk->add_option("--line-corpora", mo->line_corpora, "corpora cut at lines instead of sentences (code)");
  mk->callback([=] {
    mo->corpora = load_data_prep_config(*config, *sets);
    auto s = analysis::make_tasks(*mo);
    std::cout << s.dump(2) << "\n" << std::flush;
  });

  ev->callback([=, ev_ptr = ev] {
    if (!ev_ptr->get_subcommands().empty()) return;  // make-tasks ran
    if (o->checkpoint.empty() || o->task.empty()) throw CLI::RequiredError("--checkpoint and --task");
    auto r = analysis::eval_report(*o);
    std::cout << (*as_json ? r.dump(2) + "\n" : analysis::eval_text(r)) << std::flush;
  });
}

}  // namespace moecpt::cli

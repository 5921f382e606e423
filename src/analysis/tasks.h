// Zero-shot multiple-choice evaluation (`moecpt eval`) and the generator of the
// shipped held-out tasks (`moecpt eval make-tasks`). Task files are JSONL, one
// item per line: {"context": str, "choices": [str, ...] (>= 2), "label": int,
// "id": str (optional)}; docs/analysis.md documents the format.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/config.h"

namespace moecpt::analysis {

struct LoadedModel;  // analysis/model_runner.h

struct TaskItem {
  std::string id;
  std::string context;
  std::vector<std::string> choices;
  int64_t label = 0;
};
// Strict: every line must be a JSON object with exactly the known fields of
// the right types (non-empty choices, unique, 0 <= label < #choices); errors
// are moecpt::Error "<file>:<line>: field '<name>': <problem>".
std::vector<TaskItem> read_task_file(const std::string& path);

// Each choice is scored by the sum of log p(choice tokens | EOS + context)
// (the context cut from the left to fit seq_len). acc picks the highest sum;
// acc_norm the highest sum per UTF-8 byte of the choice (lm-eval-harness's
// acc_norm, as in HellaSwag/ARC).
struct EvalOptions {
  std::string checkpoint;
  std::string task;
  std::string tokenizer;    // "" = the checkpoint's data.tokenizer
  std::string device = "cpu";
  int64_t batch_size = 16;  // sequences (item × choice) per forward
  bool details = false;     // include per-item predictions in the report
};
nlohmann::json eval_report(const EvalOptions& opt);
// The same on a model already loaded (opt.checkpoint and opt.device are not
// read): several task files scored on one load of the checkpoint.
nlohmann::json eval_report(LoadedModel& m, const EvalOptions& opt);
std::string eval_text(const nlohmann::json& report);

// Task generation from the held-out (validation-split) documents of each
// corpus, with exactly the split of `moecpt data prepare`
// (documents.h: is_validation_document(id, val_fraction, seed)).
//   <name>-continuation.jsonl: a passage and its true continuation among
//     `n_choices - 1` continuations of passages from other held-out documents.
//   <name>-cloze.jsonl: LAMBADA-style; the passage (whole sentences / lines, up
//     to 800 bytes) ends before the last word of a sentence or clause (code: a
//     line) that already occurs in the passage; the distractors are other words
//     of the same passage (of similar length when possible), so every choice
//     occurs in the passage and copying from it does not reveal the answer.
// Code corpora (names in `line_corpora`) are cut at lines, prose at sentences.
// Deterministic: the same corpora and options give byte-identical files.
struct MakeTasksOptions {
  DataPrepConfig corpora;           // names, inputs, val_fraction, seed (as for data prepare)
  std::string out_dir = "data/tasks";
  int64_t max_items = 300;          // per file
  int64_t n_choices = 4;
  uint64_t seed = 0;                // distractor choice
  std::vector<std::string> line_corpora = {"code"};
};
// Returns {name: {"documents": n_val_docs, "continuation": {"items", "candidates",
// "file"}, "cloze": {… , "copy_solvable": items whose answer is the only choice
// found in the passage (0 by construction)}}}.
nlohmann::json make_tasks(const MakeTasksOptions& opt);

}  // namespace moecpt::analysis

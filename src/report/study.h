// `moecpt study`: the miniature replication of the paper (SPEC §4) as one
// resumable job. A study recipe (recipes/study/*.toml) names the models, the
// pre-training (PT), the continual pre-training (CPT) variants and the full
// re-training reference; plan_study() turns it into a list of training arms,
// each an ordinary moecpt Config, and run_study() trains them in order
// (finished arms are skipped, an interrupted arm resumes from its newest
// checkpoint), then saves the results and writes the report.
#pragma once
#include <string>
#include <vector>

#include "core/config.h"

namespace moecpt::report {

struct StudyArm {
  std::string name;      // "pt-granular-aux", "cpt-r40-rewarm-dense", "full-granular-aux"
  std::string kind;      // pt | cpt | full
  std::string model;     // key of the recipe's [models] table
  std::string variant;   // cpt: the variant name ("r40-rewarm"); pt: "pt"; full: "full"
  double replay = 0;     // cpt: replay fraction r
  std::string schedule;  // pt: the PT schedule type; cpt: rewarm | infinite; full: the schedule type
  std::string parent;    // cpt: the PT arm it starts from
  std::string parent_checkpoint;  // cpt: final (decayed) | pre_anneal (infinite schedule)
  Config config;         // the effective config; run.out_dir = <out>/arms/<name>
};

struct StudyPlan {
  std::string recipe_path;
  std::string name;
  std::string out_dir;
  bool quick = false;
  std::string data_config;           // data preparation recipe (tokenizer and shards)
  std::string old_data, new_data;    // D0, D1
  std::vector<std::string> validation;
  double replay_fraction = 0;        // the study's replay fraction (for the verdicts)
  double tie_nats = 0.02;            // loss differences below this are called ties
  double tie_mri = 0.02;             // MRI differences below this are called ties
  int64_t saturation_batches = 4;    // validation batches per dataset for the routing analyses
  std::vector<std::string> tasks;    // zero-shot task files (JSONL) scored on every arm's final checkpoint
  int64_t task_items = 0;            // items scored per task file (0 = all): the first N lines
  std::vector<StudyArm> arms;        // in training order: PT, then CPT, then full re-training
  std::string recipe_text;
};

// Reads a study recipe. Paths inside it (models, data, tasks) are relative to
// the recipe file. `quick` uses the recipe's quick_steps and its [quick] block
// (train overrides such as a smaller batch, fewer task items and saturation
// batches). Throws moecpt::Error naming the file and key on any problem.
StudyPlan plan_study(const std::string& recipe_path, const std::string& out_dir, bool quick);

struct StudyOptions {
  bool prepare_data = true;   // train the tokenizer / prepare shards when missing
  bool analyses = true;       // routing analyses and task evaluations of the checkpoints after training
};

// Trains every unfinished arm, runs the analyses, then writes
// <out>/results/*.json and <out>/report.html. Prints the time of each phase
// (data, each arm, saturation, task evaluations, report) as it goes; the
// totals are saved in results/study.json ("phases") and shown in the report. Returns false when interrupted (SIGINT/SIGTERM): the
// current arm was checkpointed and a re-run resumes it.
bool run_study(const StudyPlan& plan, const StudyOptions& opts = {});

// Ask a running study to stop after the current training step.
void request_study_stop();

}  // namespace moecpt::report

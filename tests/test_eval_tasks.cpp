// Zero-shot multiple-choice eval and task files: strict validation with
// file:line errors, an obvious task scored correctly by a model trained on it,
// and the shipped tasks regenerate byte for byte from the held-out documents.
#include <gtest/gtest.h>

#include <cctype>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "analysis/model_runner.h"
#include "analysis/tasks.h"
#include "core/config.h"
#include "core/error.h"
#include "data/documents.h"
#include "data/prepare.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "test_util.h"
#include "train/trainer.h"

namespace moecpt {
namespace {

const std::string kSrc = MOECPT_SOURCE_DIR;

std::string error_of(const std::string& path) {
  try {
    analysis::read_task_file(path);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(EvalTasks, BadTaskFilesNameFileLineAndField) {
  testing::TempDir dir;
  const std::string p = dir / "t.jsonl";
  const std::string good = R"({"context": "a", "choices": [" b", " c"], "label": 1})";
  struct Case {
    std::string second_line, expect;
  };
  const std::vector<Case> cases = {
      {"{not json", p + ":2: invalid JSON"},
      {"[1, 2]", p + ":2: expected a JSON object"},
      {R"({"choices": [" b", " c"], "label": 0})", p + ":2: field 'context': missing"},
      {R"({"context": 3, "choices": [" b", " c"], "label": 0})", p + ":2: field 'context': expected a string"},
      {R"({"context": "a", "label": 0})", p + ":2: field 'choices': missing"},
      {R"({"context": "a", "choices": " b", "label": 0})", p + ":2: field 'choices': expected an array"},
      {R"({"context": "a", "choices": [" b"], "label": 0})", p + ":2: field 'choices': expected at least 2"},
      {R"({"context": "a", "choices": [" b", 4], "label": 0})", p + ":2: field 'choices': choice 1 is not a string"},
      {R"({"context": "a", "choices": [" b", ""], "label": 0})", p + ":2: field 'choices': choice 1 is empty"},
      {R"({"context": "a", "choices": [" b", " b"], "label": 0})", p + ":2: field 'choices': choice 1 repeats"},
      {R"({"context": "a", "choices": [" b", " c"]})", p + ":2: field 'label': missing"},
      {R"({"context": "a", "choices": [" b", " c"], "label": "0"})", p + ":2: field 'label': expected an integer"},
      {R"({"context": "a", "choices": [" b", " c"], "label": 2})", p + ":2: field 'label': 2 is out of range for 2 choices"},
      {R"({"context": "a", "choices": [" b", " c"], "label": -1})", p + ":2: field 'label': -1 is out of range"},
      {R"({"context": "a", "choices": [" b", " c"], "label": 0, "answer": 1})", p + ":2: field 'answer': unknown field"},
      {R"({"context": "a", "choices": [" b", " c"], "label": 0, "id": 7})", p + ":2: field 'id': expected a string"},
      {R"({"context": "a", "choices": [" b", " c"], "label": 0, "id": "t:1"})", p + ":2: field 'id': 't:1' repeats"},
  };
  for (const auto& c : cases) {
    testing::write_text(p, good + "\n" + c.second_line + "\n");
    const std::string err = error_of(p);
    EXPECT_EQ(err.rfind(c.expect, 0), 0u) << "line: " << c.second_line << "\ngot: " << err;
  }
  testing::write_text(p, "\n  \n");
  EXPECT_EQ(error_of(p), p + ": task file holds no items");
  EXPECT_EQ(error_of(dir / "absent.jsonl"), (dir / "absent.jsonl") + ": task file does not exist");
  testing::write_text(p, good + "\n\n" + good + "\n");  // blank lines are skipped, ids default to stem:line
  auto items = analysis::read_task_file(p);
  ASSERT_EQ(items.size(), 2u);
  EXPECT_EQ(items[1].id, "t:3");
  EXPECT_EQ(items[1].label, 1);
  // The CLI prints the same message.
  testing::write_text(p, good + "\n" + R"({"context": "a", "choices": [" b", " c"], "label": 5})" + "\n");
  auto res = testing::run_moecpt("eval --checkpoint " + (dir / "none") + " --task " + p);
  EXPECT_NE(res.exit_code, 0);
  EXPECT_NE(res.output.find("error: " + p + ":2: field 'label': 5 is out of range for 2 choices"), std::string::npos)
      << res.output;
}

// Sentences a tiny model learns by heart; the task asks for their endings.
const std::vector<std::pair<std::string, std::string>> kFacts = {
    {"the red fox jumps over the", " lazy dog."},
    {"one two three four five six", " seven eight."},
    {"alpha beta gamma delta epsilon", " zeta eta."},
    {"Monday Tuesday Wednesday Thursday", " Friday Saturday."},
};

TEST(EvalTasks, ObviousTaskIsSolvedByAModelTrainedOnIt) {
  testing::TempDir dir;
  // A small tokenizer trained here on the shipped English corpus (the study's
  // 8192-piece model is built by `data tokenizer train`, not shipped in git).
  TokenizerConfig tc;
  tc.model = dir / "tok/facts.model";
  tc.vocab_size = 400;
  tc.max_sentences = 2000;
  train_tokenizer(tc, {read_documents(kSrc + "/data/corpora/en.jsonl")});
  const std::string tok_path = tc.model;
  Tokenizer tok(tok_path);
  // A shard of the facts repeated as documents, in a fixed shuffled order.
  std::vector<uint32_t> toks;
  std::vector<uint64_t> offs = {0};
  for (int rep = 0; rep < 80; ++rep) {
    const auto& f = kFacts[size_t((rep * 3 + rep / 4) % 4)];
    for (int t : tok.encode(f.first + f.second)) toks.push_back(uint32_t(t));
    toks.push_back(uint32_t(tok.eos_id()));
    offs.push_back(toks.size());
  }
  std::filesystem::create_directories(dir / "facts");
  for (const char* split : {"train", "val"})
    write_shard(dir / ("facts/" + std::string(split) + ".bin"), toks, offs, uint32_t(tok.vocab_size()));
  testing::write_text(dir / "r.toml", R"(
[run]
threads = 1
[model]
vocab_size = )" + std::to_string(tok.vocab_size()) + R"(
d_model = 32
n_layers = 2
n_heads = 2
seq_len = 32
ffn_hidden = 64
ffn = "moe"
n_experts = 4
top_k = 1
expert_hidden = 32
[optim]
lr = 1e-2
min_lr = 1e-3
[train]
steps = 60
batch_size = 8
log_every = 100
eval_every = 0
eval_batches = 1
[data]
tokenizer = ")" + tok_path + R"("
shard_dir = ")" + dir.path().string() + R"("
train = ["facts"]
validation = ["facts"]
)");
  train(load_config(dir / "r.toml", {"run.out_dir=\"" + (dir / "run") + "\""}));

  std::string task;
  for (size_t i = 0; i < kFacts.size(); ++i) {
    nlohmann::json choices = nlohmann::json::array();
    for (size_t c = 0; c < kFacts.size(); ++c) choices.push_back(kFacts[(i + c) % kFacts.size()].second);
    // The true ending sits at index i % 4 after rotating.
    const size_t label = i % kFacts.size();
    std::vector<std::string> rot(kFacts.size());
    for (size_t c = 0; c < kFacts.size(); ++c) rot[(c + label) % kFacts.size()] = choices[c];
    task += nlohmann::json{{"context", kFacts[i].first}, {"choices", rot}, {"label", label}}.dump() + "\n";
  }
  testing::write_text(dir / "facts.jsonl", task);

  analysis::EvalOptions o;
  o.checkpoint = dir / "run/checkpoints/final";
  o.task = dir / "facts.jsonl";
  o.details = true;
  auto r = analysis::eval_report(o);
  EXPECT_EQ(r["items"], 4);
  EXPECT_DOUBLE_EQ(r["acc"].get<double>(), 1.0) << r.dump(1);
  EXPECT_DOUBLE_EQ(r["acc_norm"].get<double>(), 1.0) << r.dump(1);
  EXPECT_DOUBLE_EQ(r["chance"].get<double>(), 0.25);
  ASSERT_EQ(r["items_detail"].size(), kFacts.size());
  for (size_t i = 0; i < kFacts.size(); ++i) {
    const auto& d = r["items_detail"][i];
    EXPECT_EQ(d["bytes"][d["label"].get<size_t>()].get<int64_t>(), int64_t(kFacts[i].second.size()));
    for (double ll : d["loglik"]) EXPECT_LT(ll, 0.0);
  }
  // The same on a model loaded once (the study scores all its task files on one load).
  auto m = analysis::load_model(o.checkpoint);
  for (int rep = 0; rep < 2; ++rep) {
    auto again = analysis::eval_report(m, o);
    EXPECT_EQ(again["items_detail"], r["items_detail"]) << "scoring " << rep + 1;
    EXPECT_EQ(again["checkpoint"], r["checkpoint"]);
  }
  // The same through the CLI.
  auto res = testing::run_moecpt("eval --checkpoint " + o.checkpoint + " --task " + o.task + " --json");
  ASSERT_EQ(res.exit_code, 0) << res.output;
  auto j = nlohmann::json::parse(res.output.substr(res.output.find('{')));
  EXPECT_DOUBLE_EQ(j["acc"].get<double>(), 1.0);
}

TEST(EvalTasks, MakeTasksIsDeterministicAndUsesOnlyHeldOutDocuments) {
  testing::TempDir dir;
  // Small corpora: 30 prose documents of 6 sentences each, 12 code documents.
  std::string prose, code;
  for (int d = 0; d < 30; ++d) {
    std::string text;
    for (int s = 0; s < 12; ++s)
      text += "Document number " + std::to_string(d) + " talks about subject" + std::to_string(s) +
              " and again about subject" + std::to_string(s) + " in sentence " + std::to_string(s) + ". ";
    prose += nlohmann::json{{"id", "p" + std::to_string(d)}, {"text", text}}.dump() + "\n";
    std::string src;
    for (int l = 0; l < 40; ++l)
      src += "    value_" + std::to_string(d) + "_" + std::to_string(l % 7) + " = compute(value_" + std::to_string(d) +
             "_" + std::to_string(l % 7) + ")\n";
    code += nlohmann::json{{"id", "c" + std::to_string(d)}, {"text", src}}.dump() + "\n";
  }
  testing::write_text(dir / "p.jsonl", prose);
  testing::write_text(dir / "c.jsonl", code);
  testing::write_text(dir / "data.toml", "[corpora]\nnames = [\"p\", \"code\"]\ninputs = [\"" + (dir / "p.jsonl") +
                                             "\", \"" + (dir / "c.jsonl") + "\"]\nval_fraction = 0.3\n");
  analysis::MakeTasksOptions o;
  o.corpora = load_data_prep_config(dir / "data.toml");
  o.out_dir = dir / "t1";
  auto s1 = analysis::make_tasks(o);
  o.out_dir = dir / "t2";
  analysis::make_tasks(o);
  std::vector<Document> pdocs = read_documents(dir / "p.jsonl");
  std::vector<const Document*> tr, val;
  split_documents(pdocs, 0.3, 0, tr, val);
  ASSERT_GE(val.size(), 2u);
  for (const char* f : {"p-continuation.jsonl", "p-cloze.jsonl", "code-continuation.jsonl", "code-cloze.jsonl"}) {
    ASSERT_TRUE(std::filesystem::exists(dir / ("t1/" + std::string(f)))) << f << "\n" << s1.dump(1);
    EXPECT_EQ(testing::read_text(dir / ("t1/" + std::string(f))), testing::read_text(dir / ("t2/" + std::string(f))));
    auto items = analysis::read_task_file(dir / ("t1/" + std::string(f)));
    EXPECT_GT(items.size(), 3u) << f;
    for (const auto& it : items) EXPECT_EQ(it.choices.size(), 4u);
  }
  // Prose items: the context and its answer come from one held-out document.
  for (const auto& it : analysis::read_task_file(dir / "t1/p-continuation.jsonl")) {
    bool found = false;
    for (const auto* d : val) {
      if (d->text.find(it.context.substr(0, 40)) != std::string::npos) {
        found = true;
        EXPECT_NE(d->text.find(it.choices[size_t(it.label)].substr(1, 30)), std::string::npos);
      }
    }
    EXPECT_TRUE(found) << it.context;
  }
  for (const auto& it : analysis::read_task_file(dir / "t1/p-cloze.jsonl")) {
    const std::string w = it.choices[size_t(it.label)].substr(1);
    EXPECT_NE(it.context.find(w), std::string::npos) << "cloze word must occur in the passage: " << w;
    // Distractors are words of the same passage: copying from it does not give the answer.
    for (const auto& c : it.choices) EXPECT_NE(it.context.find(c.substr(1)), std::string::npos) << c;
  }
  EXPECT_EQ(s1["p"]["cloze"]["copy_solvable"], 0);
  EXPECT_EQ(s1["code"]["cloze"]["copy_solvable"], 0);
}

TEST(EvalTasks, ShippedTasksParseAndRegenerateByteForByte) {
  testing::TempDir dir;
  analysis::MakeTasksOptions o;
  o.corpora = load_data_prep_config(kSrc + "/recipes/data/corpora.toml");
  for (auto& in : o.corpora.corpora.inputs) in = kSrc + "/" + in;
  o.out_dir = dir / "tasks";
  analysis::make_tasks(o);
  int files = 0;
  for (const auto& e : std::filesystem::directory_iterator(kSrc + "/data/tasks")) {
    if (e.path().extension() != ".jsonl") continue;
    ++files;
    const auto items = analysis::read_task_file(e.path().string());
    EXPECT_GE(items.size(), 50u) << e.path();
    // Cloze: every choice occurs as a whole word in the passage (code: an identifier),
    // so a "copy a word from the passage" heuristic has nothing to go on.
    if (e.path().string().find("-cloze") != std::string::npos)
      for (const auto& it : items)
        for (const auto& c : it.choices) {
          const std::string w = c.substr(c.find_first_not_of(' '));
          const bool code = e.path().filename().string().rfind("code", 0) == 0;
          auto is_word = [&](char ch) {  // as make-tasks splits words: identifiers / letter runs
            const auto u = (unsigned char)ch;
            return code ? std::isalnum(u) || ch == '_' : std::isalpha(u) || u >= 0x80;
          };
          bool found = false;
          for (size_t p = it.context.find(w); p != std::string::npos && !found; p = it.context.find(w, p + 1))
            found = (p == 0 || !is_word(it.context[p - 1])) && (p + w.size() == it.context.size() || !is_word(it.context[p + w.size()]));
          EXPECT_TRUE(found) << it.id << ": choice '" << c << "' does not occur in the passage";
        }
    EXPECT_EQ(testing::read_text(e.path().string()), testing::read_text(dir / ("tasks/" + e.path().filename().string())))
        << e.path() << " differs from what `moecpt eval make-tasks` generates now";
  }
  EXPECT_EQ(files, 6);
}

}  // namespace
}  // namespace moecpt

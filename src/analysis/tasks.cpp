#include "analysis/tasks.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "analysis/model_runner.h"
#include "core/atomic_file.h"
#include "core/error.h"
#include "data/documents.h"
#include "data/mixture.h"
#include "data/shard.h"
#include "data/tokenizer.h"

namespace moecpt::analysis {
namespace fs = std::filesystem;
using nlohmann::json;

// ---------------------------------------------------------------- task files

std::vector<TaskItem> read_task_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw file_error(path, fs::exists(path) ? "cannot read task file" : "task file does not exist");
  std::vector<TaskItem> items;
  std::set<std::string> ids;
  std::string line;
  size_t lineno = 0;
  const std::string stem = fs::path(path).stem().string();
  while (std::getline(in, line)) {
    ++lineno;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = path + ":" + std::to_string(lineno);
    auto bad = [&](const std::string& field, const std::string& problem) {
      return Error(where + ": " + (field.empty() ? "" : "field '" + field + "': ") + problem);
    };
    json j;
    try {
      j = json::parse(line);
    } catch (const json::exception& e) {
      throw bad("", std::string("invalid JSON (") + e.what() + ")");
    }
    if (!j.is_object()) throw bad("", "expected a JSON object {\"context\", \"choices\", \"label\", \"id\"?}");
    for (const auto& [k, v] : j.items())
      if (k != "context" && k != "choices" && k != "label" && k != "id")
        throw bad(k, "unknown field (allowed: context, choices, label, id)");
    TaskItem it;
    if (!j.contains("context")) throw bad("context", "missing");
    if (!j["context"].is_string()) throw bad("context", "expected a string");
    it.context = j["context"].get<std::string>();
    if (!j.contains("choices")) throw bad("choices", "missing");
    if (!j["choices"].is_array()) throw bad("choices", "expected an array of strings");
    if (j["choices"].size() < 2) throw bad("choices", "expected at least 2 choices, got " + std::to_string(j["choices"].size()));
    std::set<std::string> seen;
    for (size_t c = 0; c < j["choices"].size(); ++c) {
      const auto& v = j["choices"][c];
      if (!v.is_string()) throw bad("choices", "choice " + std::to_string(c) + " is not a string");
      auto s = v.get<std::string>();
      if (s.empty()) throw bad("choices", "choice " + std::to_string(c) + " is empty");
      if (!seen.insert(s).second) throw bad("choices", "choice " + std::to_string(c) + " repeats an earlier choice");
      it.choices.push_back(std::move(s));
    }
    if (!j.contains("label")) throw bad("label", "missing");
    if (!j["label"].is_number_integer()) throw bad("label", "expected an integer index into choices");
    it.label = j["label"].get<int64_t>();
    if (it.label < 0 || it.label >= int64_t(it.choices.size()))
      throw bad("label", std::to_string(it.label) + " is out of range for " + std::to_string(it.choices.size()) + " choices");
    if (j.contains("id")) {
      if (!j["id"].is_string()) throw bad("id", "expected a string");
      it.id = j["id"].get<std::string>();
    } else {
      it.id = stem + ":" + std::to_string(lineno);
    }
    if (!ids.insert(it.id).second) throw bad("id", "'" + it.id + "' repeats an earlier item's id");
    items.push_back(std::move(it));
  }
  if (items.empty()) throw file_error(path, "task file holds no items");
  return items;
}

// ---------------------------------------------------------------- scoring

namespace {

// Tokens of one (item, choice): EOS + context + choice, cut from the left to fit.
struct Scored {
  std::vector<int64_t> tokens;
  int64_t n_choice = 0;  // the last n_choice tokens are the choice
};

Scored encode_choice(const Tokenizer& tok, const std::vector<int>& ctx, const std::string& context,
                     const std::string& choice, int64_t max_len) {
  std::vector<int> full = tok.encode(context + choice), cont;
  if (full.size() > ctx.size() && std::equal(ctx.begin(), ctx.end(), full.begin()))
    cont.assign(full.begin() + long(ctx.size()), full.end());
  else
    cont = tok.encode(choice);
  Scored s;
  s.tokens.push_back(tok.eos_id());
  for (int t : ctx) s.tokens.push_back(t);
  for (int t : cont) s.tokens.push_back(t);
  s.n_choice = int64_t(cont.size());
  if (int64_t(s.tokens.size()) > max_len) s.tokens.erase(s.tokens.begin(), s.tokens.end() - max_len);
  s.n_choice = std::min<int64_t>(s.n_choice, int64_t(s.tokens.size()) - 1);
  return s;
}

// Scores `items` on the loaded model (eval_report's two entry points).
json eval_items(LoadedModel& m, const EvalOptions& opt, const std::vector<TaskItem>& items) {
  const std::string tpath = opt.tokenizer.empty() ? m.cfg.data.tokenizer : opt.tokenizer;
  Tokenizer tok(tpath);
  if (tok.vocab_size() > m.cfg.model.vocab_size)
    throw file_error(tpath, "tokenizer vocabulary (" + std::to_string(tok.vocab_size()) + ") is larger than the model's (" +
                                std::to_string(m.cfg.model.vocab_size) + ")");
  const int64_t max_len = m.cfg.model.seq_len + 1;

  // Every (item, choice) sequence, scored in batches.
  std::vector<Scored> seqs;
  std::vector<std::pair<size_t, size_t>> owner;
  for (size_t i = 0; i < items.size(); ++i) {
    auto ctx = tok.encode(items[i].context);
    for (size_t c = 0; c < items[i].choices.size(); ++c) {
      seqs.push_back(encode_choice(tok, ctx, items[i].context, items[i].choices[c], max_len));
      owner.emplace_back(i, c);
    }
  }
  std::vector<double> loglik(seqs.size());
  int64_t tokens = 0;
  torch::NoGradGuard no_grad;
  for (size_t b0 = 0; b0 < seqs.size(); b0 += size_t(std::max<int64_t>(1, opt.batch_size))) {
    const size_t b1 = std::min(seqs.size(), b0 + size_t(std::max<int64_t>(1, opt.batch_size)));
    int64_t Lmax = 0;
    for (size_t s = b0; s < b1; ++s) Lmax = std::max<int64_t>(Lmax, int64_t(seqs[s].tokens.size()));
    auto batch = torch::zeros({int64_t(b1 - b0), Lmax}, torch::kInt64);  // right padding: causal, never attended to
    auto acc = batch.accessor<int64_t, 2>();
    for (size_t s = b0; s < b1; ++s)
      for (size_t t = 0; t < seqs[s].tokens.size(); ++t) acc[int64_t(s - b0)][int64_t(t)] = seqs[s].tokens[t];
    auto inputs = batch.narrow(1, 0, Lmax - 1).to(m.device);
    auto logp_BTV = torch::log_softmax(m.model->forward(inputs).logits_BTV.to(torch::kFloat32), -1);
    auto targets = batch.narrow(1, 1, Lmax - 1).to(m.device);
    auto lp_BT = logp_BTV.gather(2, targets.unsqueeze(2)).squeeze(2).to(torch::kCPU).to(torch::kFloat64).contiguous();
    auto lp = lp_BT.accessor<double, 2>();
    for (size_t s = b0; s < b1; ++s) {
      const int64_t n = int64_t(seqs[s].tokens.size());
      tokens += n;
      double sum = 0;
      // token t (t >= 1) is predicted at position t-1
      for (int64_t t = n - seqs[s].n_choice; t < n; ++t) sum += lp[int64_t(s - b0)][t - 1];
      loglik[s] = sum;
    }
  }

  json details = json::array();
  int64_t correct = 0, correct_norm = 0;
  double chance = 0;
  size_t s = 0;
  for (const auto& it : items) {
    int64_t pred = 0, pred_norm = 0;
    std::vector<double> ll;
    std::vector<int64_t> bytes;
    for (size_t c = 0; c < it.choices.size(); ++c, ++s) {
      ll.push_back(loglik[s]);
      bytes.push_back(int64_t(it.choices[c].size()));
      if (ll[c] > ll[size_t(pred)]) pred = int64_t(c);
      if (ll[c] / double(bytes[c]) > ll[size_t(pred_norm)] / double(bytes[size_t(pred_norm)])) pred_norm = int64_t(c);
    }
    correct += pred == it.label;
    correct_norm += pred_norm == it.label;
    chance += 1.0 / double(it.choices.size());
    if (opt.details)
      details.push_back({{"id", it.id}, {"label", it.label}, {"pred", pred}, {"pred_norm", pred_norm},
                         {"loglik", ll}, {"bytes", bytes}});
  }
  const double n = double(items.size());
  json r = {{"kind", "eval"},
            {"checkpoint", m.dir},
            {"task", opt.task},
            {"items", int64_t(items.size())},
            {"acc", double(correct) / n},
            {"acc_norm", double(correct_norm) / n},
            {"correct", correct},
            {"correct_norm", correct_norm},
            {"chance", chance / n},
            {"tokens", tokens}};
  if (opt.details) r["items_detail"] = details;
  return r;
}

}  // namespace

json eval_report(const EvalOptions& opt) {
  const auto items = read_task_file(opt.task);  // a bad task file is reported before the checkpoint is loaded
  LoadedModel m = load_model(opt.checkpoint, opt.device);
  return eval_items(m, opt, items);
}

json eval_report(LoadedModel& m, const EvalOptions& opt) { return eval_items(m, opt, read_task_file(opt.task)); }

std::string eval_text(const json& r) {
  char buf[512];
  std::snprintf(buf, sizeof buf, "%s: %lld items, acc %.4f (%lld), acc_norm %.4f (%lld), chance %.4f, %lld tokens\n",
                r["task"].get<std::string>().c_str(), (long long)r["items"].get<int64_t>(), r["acc"].get<double>(),
                (long long)r["correct"].get<int64_t>(), r["acc_norm"].get<double>(),
                (long long)r["correct_norm"].get<int64_t>(), r["chance"].get<double>(),
                (long long)r["tokens"].get<int64_t>());
  return buf;
}

// ---------------------------------------------------------------- task generation

namespace {

uint64_t mix(uint64_t a, uint64_t b) { return splitmix64(a * 0x9E3779B97F4A7C15ULL ^ splitmix64(b)); }
uint64_t hash_str(const std::string& s) { return fnv1a64(s.data(), s.size()); }

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

std::string collapse_spaces(const std::string& s) {
  std::string out;
  bool sp = false;
  for (char c : s) {
    if (is_space(c)) {
      sp = true;
      continue;
    }
    if (sp && !out.empty()) out += ' ';
    sp = false;
    out += c;
  }
  return out;
}

std::string rstrip(std::string s) {
  while (!s.empty() && is_space(s.back())) s.pop_back();
  return s;
}

// Unit boundaries: prose = just after a sentence end ([.!?] (closing quote or
// bracket)* then whitespace); code = every newline. Returns positions b with
// b[0] = 0 and b.back() = text size.
// With `clauses`, prose also breaks after , ; : followed by whitespace.
std::vector<size_t> boundaries(const std::string& t, bool lines, bool clauses = false) {
  std::vector<size_t> b = {0};
  for (size_t i = 0; i < t.size(); ++i) {
    if (lines) {
      if (t[i] == '\n' && i > b.back()) b.push_back(i);
    } else if (t[i] == '.' || t[i] == '!' || t[i] == '?' || (clauses && (t[i] == ',' || t[i] == ';' || t[i] == ':'))) {
      size_t j = i + 1;
      while (j < t.size() && (t[j] == '"' || t[j] == '\'' || t[j] == ')')) ++j;
      if (j < t.size() && is_space(t[j])) b.push_back(j);
    }
  }
  if (b.back() != t.size()) b.push_back(t.size());
  return b;
}

// Normalised pieces: prose collapses whitespace runs to one space; code keeps
// lines but removes blank lines at the edges.
std::string norm_context(const std::string& s, bool lines) {
  if (!lines) return collapse_spaces(s);
  size_t a = 0;
  while (a < s.size() && (s[a] == '\n' || s[a] == '\r')) ++a;
  return rstrip(s.substr(a));
}
std::string norm_continuation(const std::string& s, bool lines) {
  // Built by appending: GCC 12 warns falsely on "literal" + std::string&& (bug 105651).
  std::string out(lines ? "\n" : " ");
  if (!lines) {
    out += collapse_spaces(s);
    return out;
  }
  // "\n" + the first non-blank line with its indentation, and what follows.
  size_t a = 0, line_start = 0;
  while (a < s.size() && is_space(s[a])) {
    if (s[a] == '\n') line_start = a + 1;
    ++a;
  }
  out += rstrip(s.substr(std::min(line_start, s.size())));
  return out;
}

struct Candidate {
  size_t doc = 0;
  std::string id;
  std::string context, answer;
  std::vector<std::string> context_words;  // cloze: distinct words of the context other than the answer
  uint64_t order = 0;
};

// Words: prose = runs of letters (ASCII letters or UTF-8 multibyte); code = identifiers.
bool word_char(unsigned char c, bool lines) {
  if (lines) return std::isalnum(c) || c == '_';
  return std::isalpha(c) || c >= 0x80;
}
std::vector<std::pair<size_t, size_t>> words_of(const std::string& t, bool lines) {
  std::vector<std::pair<size_t, size_t>> w;
  for (size_t i = 0; i < t.size();) {
    if (!word_char((unsigned char)t[i], lines)) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < t.size() && word_char((unsigned char)t[j], lines)) ++j;
    if (!lines || !std::isdigit((unsigned char)t[i])) w.emplace_back(i, j);
    i = j;
  }
  return w;
}
bool contains_word(const std::string& text, const std::string& w, bool lines) {
  for (const auto& [a, b] : words_of(text, lines))
    if (text.compare(a, b - a, w) == 0 && b - a == w.size()) return true;
  return false;
}

constexpr size_t kContextMin = 200, kContextMax = 800, kContMin = 50, kContMax = 250, kWordMin = 4;

std::vector<Candidate> continuation_candidates(const std::vector<const Document*>& docs, bool lines) {
  std::vector<Candidate> out;
  for (size_t d = 0; d < docs.size(); ++d) {
    const std::string& t = docs[d]->text;
    const auto b = boundaries(t, lines);
    size_t i = 0;
    while (i + 2 < b.size()) {
      size_t j = i + 1;
      while (j < b.size() - 1 && b[j] - b[i] < kContextMin) ++j;
      if (b[j] - b[i] > kContextMax) {  // one huge unit: start after it
        i = j;
        continue;
      }
      size_t k = j + 1;
      while (k < b.size() - 1 && b[k] - b[j] < kContMin) ++k;
      if (b[k] - b[j] < kContMin || b[k] - b[j] > kContMax) {
        i = j;
        continue;
      }
      Candidate c;
      c.doc = d;
      c.context = norm_context(t.substr(b[i], b[j] - b[i]), lines);
      c.answer = norm_continuation(t.substr(b[j], b[k] - b[j]), lines);
      c.id = docs[d]->id + "@" + std::to_string(b[j]);
      if (c.context.size() >= kContextMin / 2 && c.answer.size() > 1) out.push_back(std::move(c));
      i = k;
    }
  }
  return out;
}

// Cloze targets: the last word of a unit (prose: a sentence or a clause ending
// in , ; :; code: a line) that already occurs in the context before it. The
// context is as many whole sentences (code: lines) before the word as fit in
// kContextMax bytes (at least kContextMin); targets lie at least kClozeSpacing
// bytes apart, so one document gives many overlapping windows. The distinct
// words of the context (other than the answer) are kept: the distractors are
// drawn from them, so every choice occurs in the passage and copying a word
// from the passage does not tell the answer.
constexpr size_t kClozeSpacing = 100;

std::vector<Candidate> cloze_candidates(const std::vector<const Document*>& docs, bool lines) {
  std::vector<Candidate> out;
  for (size_t d = 0; d < docs.size(); ++d) {
    const std::string& t = docs[d]->text;
    const auto units = boundaries(t, lines, /*clauses=*/!lines);
    const auto starts = boundaries(t, lines);  // whole sentences / lines
    size_t next_ok = kContextMin;
    for (size_t u = 1; u < units.size(); ++u) {
      if (units[u] < next_ok) continue;
      // The last word of the unit ending at units[u].
      const size_t lo = units[u - 1];
      auto ws = words_of(t.substr(lo, units[u] - lo), lines);
      if (ws.empty()) continue;
      const size_t wa = lo + ws.back().first, wb = lo + ws.back().second;
      const std::string w = t.substr(wa, wb - wa);
      if (w.size() < kWordMin) continue;
      // Context: from the earliest sentence/line start at most kContextMax bytes before the word.
      auto it = std::lower_bound(starts.begin(), starts.end(), wa >= kContextMax ? wa - kContextMax : 0);
      if (it == starts.end() || *it > wa || wa - *it < kContextMin) continue;
      std::string raw = t.substr(*it, wa - *it);
      const bool space_before = !raw.empty() && is_space(raw.back());
      std::string ctx = lines ? norm_context(raw, true) : collapse_spaces(raw);
      if (!lines || space_before) ctx = rstrip(ctx);
      if (!contains_word(ctx, w, lines)) continue;  // LAMBADA: the word is guessable from the passage
      Candidate c;
      c.doc = d;
      c.context = ctx;
      c.answer = (space_before || !lines ? " " : "") + w;
      c.id = docs[d]->id + "@" + std::to_string(wa);
      std::set<std::string> seen = {w};
      for (const auto& [a, b] : words_of(ctx, lines))
        if (b - a >= kWordMin && seen.insert(ctx.substr(a, b - a)).second) c.context_words.push_back(ctx.substr(a, b - a));
      out.push_back(std::move(c));
      next_ok = wb + kClozeSpacing;
    }
  }
  return out;
}

// Keep at most `n` candidates, chosen by a seeded hash, in document order.
void subsample(std::vector<Candidate>& c, int64_t n, uint64_t seed) {
  for (size_t i = 0; i < c.size(); ++i) c[i].order = mix(seed, hash_str(c[i].id));
  if (int64_t(c.size()) > n) {
    std::vector<size_t> idx(c.size());
    for (size_t i = 0; i < idx.size(); ++i) idx[i] = i;
    std::stable_sort(idx.begin(), idx.end(), [&](size_t a, size_t b) { return c[a].order < c[b].order; });
    idx.resize(size_t(n));
    std::sort(idx.begin(), idx.end());
    std::vector<Candidate> kept;
    for (size_t i : idx) kept.push_back(c[i]);
    c = std::move(kept);
  }
}

// Pick n-1 distractors from `pool` (other documents, length within a factor
// 1.5 of the answer when possible), place the answer at a seeded position.
json make_item(const std::string& id, const Candidate& c, const std::vector<std::pair<size_t, std::string>>& pool,
               int64_t n_choices, uint64_t seed, bool close_length) {
  std::vector<std::string> distractors;
  std::set<std::string> used = {c.answer};
  const double len = double(c.answer.size());
  for (int pass = 0; pass < 2 && int64_t(distractors.size()) < n_choices - 1; ++pass)
    for (uint64_t attempt = 0; attempt < 4 * pool.size() + 64 && int64_t(distractors.size()) < n_choices - 1; ++attempt) {
      const auto& [doc, text] = pool[mix(mix(seed, hash_str(c.id)), attempt + 1000003ULL * uint64_t(pass)) % pool.size()];
      if (doc == c.doc || used.count(text)) continue;
      const double r = double(text.size()) / len;
      if (pass == 0 && close_length && (r < 2.0 / 3.0 || r > 1.5)) continue;
      if (pass == 0 && !close_length && std::abs(double(text.size()) - len) > 2) continue;
      used.insert(text);
      distractors.push_back(text);
    }
  if (int64_t(distractors.size()) < n_choices - 1) return nullptr;
  const int64_t label = int64_t(mix(seed ^ 0xA5A5, hash_str(c.id)) % uint64_t(n_choices));
  std::vector<std::string> choices = distractors;
  choices.insert(choices.begin() + label, c.answer);
  return {{"id", id}, {"context", c.context}, {"choices", choices}, {"label", label}};
}

std::string write_items(const std::string& path, const std::vector<json>& items) {
  std::string out;
  for (const auto& j : items) out += j.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
  write_file_atomic(path, out);
  return path;
}

}  // namespace

json make_tasks(const MakeTasksOptions& opt) {
  const auto& cc = opt.corpora.corpora;
  if (opt.n_choices < 2) throw Error("make-tasks: --choices must be at least 2");
  fs::create_directories(opt.out_dir);
  json summary = json::object();
  for (size_t n = 0; n < cc.names.size(); ++n) {
    const std::string& name = cc.names[n];
    const bool lines = std::find(opt.line_corpora.begin(), opt.line_corpora.end(), name) != opt.line_corpora.end();
    auto docs = read_documents(cc.inputs[n]);
    std::vector<const Document*> train, val;
    split_documents(docs, cc.val_fraction, uint64_t(cc.seed), train, val);
    json js = {{"input", cc.inputs[n]}, {"documents", val.size()}, {"units", lines ? "lines" : "sentences"}};
    for (const char* kind : {"continuation", "cloze"}) {
      const bool cont = std::string(kind) == "continuation";
      auto cands = cont ? continuation_candidates(val, lines) : cloze_candidates(val, lines);
      std::vector<std::pair<size_t, std::string>> pool;
      if (cont) {
        for (const auto& c : cands) pool.emplace_back(c.doc, c.answer);
      } else {  // distractors come from each passage's own words: too few of them, no item
        std::erase_if(cands, [&](const Candidate& c) { return int64_t(c.context_words.size()) < opt.n_choices - 1; });
      }
      const size_t total = cands.size();
      subsample(cands, opt.max_items, opt.seed);
      std::vector<json> items;
      int64_t copy_solvable = 0;  // cloze: the answer is the only choice that occurs in the passage
      for (size_t i = 0; i < cands.size(); ++i) {
        char idbuf[32];
        std::snprintf(idbuf, sizeof idbuf, "%04zu", items.size());
        if (!cont) {  // the words of the passage, with the answer's leading space (if any)
          const std::string prefix = cands[i].answer.substr(0, cands[i].answer.find_first_not_of(' '));
          pool.clear();
          for (const auto& w : cands[i].context_words) pool.emplace_back(size_t(-1), prefix + w);
        }
        json item = make_item(name + "-" + (cont ? "cont-" : "cloze-") + idbuf, cands[i], pool, opt.n_choices, opt.seed,
                              cont);
        if (item.is_null()) continue;
        if (!cont) {
          int64_t in_ctx = 0;
          for (const auto& ch : item["choices"]) {
            std::string w = ch.get<std::string>();
            w.erase(0, w.find_first_not_of(' '));
            in_ctx += contains_word(cands[i].context, w, lines);
          }
          copy_solvable += in_ctx == 1;
        }
        items.push_back(std::move(item));
      }
      if (items.empty()) {
        js[kind] = {{"items", 0}, {"candidates", total}};
        continue;
      }
      const std::string path = (fs::path(opt.out_dir) / (name + "-" + kind + ".jsonl")).string();
      write_items(path, items);
      js[kind] = {{"items", items.size()}, {"candidates", total}, {"file", path}};
      if (!cont) js[kind]["copy_solvable"] = copy_solvable;
    }
    summary[name] = js;
  }
  return summary;
}

}  // namespace moecpt::analysis

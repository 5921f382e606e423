#include "core/config.h"

#include <charconv>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <set>
#include <sstream>
#include <toml++/toml.h>

#include "core/atomic_file.h"
#include "core/error.h"

namespace moecpt {
namespace {

namespace fs = std::filesystem;

// Where values came from, so errors can say "file: key 'x' (set on the command line)".
struct Origin {
  std::string file;
  std::set<std::string> overridden;
  std::string where(const std::string& key) const {
    return overridden.count(key) ? " (set on the command line with --set)" : "";
  }
};

std::string describe_range(const Range& r) {
  auto num = [](double x) {
    std::ostringstream os;
    os << x;
    return os.str();
  };
  const bool has_lo = std::isfinite(r.lo), has_hi = std::isfinite(r.hi);
  if (has_lo && has_hi) return "in [" + num(r.lo) + ", " + num(r.hi) + "]";
  if (has_lo) return (r.lo_open ? "> " : ">= ") + num(r.lo);
  if (has_hi) return "<= " + num(r.hi);
  return "";
}

std::string node_repr(const toml::node& node) {
  std::ostringstream os;
  node.visit([&](auto&& n) { os << n; });
  return os.str();
}

std::string type_name(const toml::node& node) {
  switch (node.type()) {
    case toml::node_type::string: return "a string";
    case toml::node_type::integer: return "an integer";
    case toml::node_type::floating_point: return "a float";
    case toml::node_type::boolean: return "a boolean";
    case toml::node_type::array: return "an array";
    case toml::node_type::table: return "a table";
    default: return "a date/time";
  }
}

// Visitor that fills a config struct from a TOML table, checking types,
// ranges, choices and unknown keys.
class Reader {
 public:
  Reader(const toml::table& table, std::string prefix, const Origin& origin)
      : table_(table), prefix_(std::move(prefix)), origin_(origin) {}

  void operator()(const char* key, int64_t& out, const char*, Range range = {}) {
    const toml::node* n = take(key);
    if (!n) return;
    auto v = n->value_exact<int64_t>();
    if (!v) fail(key, "expected an integer, got " + type_name(*n) + " " + node_repr(*n));
    check_range(key, double(*v), range, node_repr(*n));
    out = *v;
  }
  void operator()(const char* key, double& out, const char*, Range range = {}) {
    const toml::node* n = take(key);
    if (!n) return;
    std::optional<double> v;
    if (n->is_floating_point()) v = n->as_floating_point()->get();
    if (n->is_integer()) v = double(n->as_integer()->get());
    if (!v) fail(key, "expected a number, got " + type_name(*n) + " " + node_repr(*n));
    if (!std::isfinite(*v)) fail(key, "expected a finite number, got " + node_repr(*n));
    check_range(key, *v, range, node_repr(*n));
    out = *v;
  }
  void operator()(const char* key, bool& out, const char*) {
    const toml::node* n = take(key);
    if (!n) return;
    if (!n->is_boolean()) fail(key, "expected true or false, got " + type_name(*n) + " " + node_repr(*n));
    out = n->as_boolean()->get();
  }
  void operator()(const char* key, std::string& out, const char*, const Choices& choices = {}) {
    const toml::node* n = take(key);
    if (!n) return;
    if (!n->is_string()) fail(key, "expected a string, got " + type_name(*n) + " " + node_repr(*n));
    std::string v = n->as_string()->get();
    if (!choices.empty() && std::find(choices.begin(), choices.end(), v) == choices.end()) {
      std::string list;
      for (const auto& c : choices) list += (list.empty() ? "" : ", ") + ("\"" + c + "\"");
      fail(key, "expected one of " + list + ", got \"" + v + "\"");
    }
    out = v;
  }
  void operator()(const char* key, std::vector<std::string>& out, const char*) {
    const toml::node* n = take(key);
    if (!n) return;
    if (n->is_string()) {  // a bare string is a one-element list (handy with --set)
      out = {n->as_string()->get()};
      return;
    }
    if (!n->is_array()) fail(key, "expected an array of strings, got " + type_name(*n));
    std::vector<std::string> v;
    for (const auto& e : *n->as_array()) {
      if (!e.is_string()) fail(key, "expected an array of strings, found element " + node_repr(e));
      v.push_back(e.as_string()->get());
    }
    out = std::move(v);
  }
  void operator()(const char* key, std::vector<double>& out, const char*) {
    const toml::node* n = take(key);
    if (!n) return;
    if (!n->is_array()) fail(key, "expected an array of numbers, got " + type_name(*n));
    std::vector<double> v;
    for (const auto& e : *n->as_array()) {
      if (e.is_floating_point()) v.push_back(e.as_floating_point()->get());
      else if (e.is_integer()) v.push_back(double(e.as_integer()->get()));
      else fail(key, "expected an array of numbers, found element " + node_repr(e));
    }
    out = std::move(v);
  }

  template <class S>
  void section(const char* key, S& s) {
    const toml::node* n = take(key);
    if (!n) return;
    if (!n->is_table()) fail(key, "expected a table [" + full(key) + "], got " + type_name(*n));
    Reader sub(*n->as_table(), full(key) + ".", origin_);
    s.visit(sub);
    sub.finish();
  }

  // Any key nobody asked for is a typo or a key from another version: refuse it.
  void finish() const {
    for (const auto& [k, v] : table_) {
      std::string key(k.str());
      if (!seen_.count(key))
        throw Error(origin_.file + ": unknown key '" + full(key) + "'" + origin_.where(full(key)) +
                    (prefix_.empty() ? ""
                                     : " in section [" + prefix_.substr(0, prefix_.size() - 1) + "]"));
    }
  }

 private:
  const toml::node* take(const char* key) {
    seen_.insert(key);
    return table_.get(key);
  }
  std::string full(const std::string& key) const { return prefix_ + key; }
  [[noreturn]] void fail(const char* key, const std::string& what) const {
    throw Error(origin_.file + ": key '" + full(key) + "'" + origin_.where(full(key)) + ": " + what);
  }
  void check_range(const char* key, double v, const Range& r, const std::string& repr) const {
    bool ok = (r.lo_open ? v > r.lo : v >= r.lo) && v <= r.hi;
    if (!ok) fail(key, "expected a value " + describe_range(r) + ", got " + repr);
  }

  const toml::table& table_;
  std::string prefix_;
  const Origin& origin_;
  std::set<std::string> seen_;
};

std::string format_double(double x) {
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof buf, x);  // shortest round-trip form
  std::string s(buf, res.ptr);
  if (s.find_first_of(".eEn") == std::string::npos) s += ".0";
  return s;
}

std::string quote(const std::string& s) {
  std::ostringstream os;
  os << toml::value<std::string>(s);
  return os.str();
}

// Visitor that prints every key with its value and its documentation.
class Writer {
 public:
  explicit Writer(std::ostringstream& os) : os_(os) {}
  void operator()(const char* key, int64_t v, const char* doc, Range = {}) { line(key, std::to_string(v), doc); }
  void operator()(const char* key, double v, const char* doc, Range = {}) { line(key, format_double(v), doc); }
  void operator()(const char* key, bool v, const char* doc) { line(key, v ? "true" : "false", doc); }
  void operator()(const char* key, const std::string& v, const char* doc, const Choices& = {}) {
    line(key, quote(v), doc);
  }
  void operator()(const char* key, const std::vector<std::string>& v, const char* doc) {
    std::string s = "[";
    for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + quote(v[i]);
    line(key, s + "]", doc);
  }
  void operator()(const char* key, const std::vector<double>& v, const char* doc) {
    std::string s = "[";
    for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + format_double(v[i]);
    line(key, s + "]", doc);
  }
  template <class S>
  void section(const char* key, S& s) {
    os_ << "\n[" << key << "]\n";
    s.visit(*this);
  }

 private:
  void line(const char* key, const std::string& value, const char* doc) {
    os_ << key << " = " << value << "  # " << doc << "\n";
  }
  std::ostringstream& os_;
};

// Deep merge: keys of `over` replace those of `base`; sub-tables merge.
void merge_into(toml::table& base, const toml::table& over) {
  for (const auto& [k, v] : over) {
    if (v.is_table() && base.get(k) && base.get(k)->is_table()) {
      merge_into(*base.get(k)->as_table(), *v.as_table());
    } else {
      base.insert_or_assign(k, v);
    }
  }
}

// toml++ 3.3 (Debian 12's, and the bundled fallback) reaches
// __builtin_unreachable() -- undefined behaviour, found by fuzz/fuzz_config.cpp
// with UBSan -- when it tests some non-ASCII code points (U+00A1..U+0499,
// U+2D6E..U+3167) for being whitespace: wherever a token may start, and in
// multi-line basic strings right after a backslash. Valid TOML has non-ASCII
// text only inside strings and comments, so those places are checked here first
// and refused with a clear error. Returns "" or "<line>:<column>: invalid TOML: <problem>".
std::string unsafe_toml_text(const std::string& text) {
  enum { kNormal, kComment, kBasic, kLiteral, kMlBasic, kMlLiteral } st = kNormal;
  size_t line = 1, col = 1;
  auto at = [&](const std::string& what) {
    return std::to_string(line) + ":" + std::to_string(col) + ": invalid TOML: " + what;
  };
  auto starts = [&](size_t i, const char* s) { return text.compare(i, std::strlen(s), s) == 0; };
  for (size_t i = 0; i < text.size(); ++i, ++col) {
    const unsigned char c = static_cast<unsigned char>(text[i]);
    if (c == '\n') {
      if (st == kComment || st == kBasic || st == kLiteral) st = kNormal;
      ++line;
      col = 0;
      continue;
    }
    switch (st) {
      case kNormal:
        if (c >= 0x80) return at("non-ASCII character outside a string or comment");
        if (c == '#') {
          st = kComment;
        } else if (starts(i, "\"\"\"")) {
          st = kMlBasic, i += 2, col += 2;
        } else if (starts(i, "'''")) {
          st = kMlLiteral, i += 2, col += 2;
        } else if (c == '"') {
          st = kBasic;
        } else if (c == '\'') {
          st = kLiteral;
        }
        break;
      case kComment:
        break;
      case kBasic:
        if (c == '\\' && i + 1 < text.size() && text[i + 1] != '\n') ++i, ++col;
        else if (c == '"') st = kNormal;
        break;
      case kLiteral:
        if (c == '\'') st = kNormal;
        break;
      case kMlLiteral:
        if (starts(i, "'''")) st = kNormal, i += 2, col += 2;
        break;
      case kMlBasic:
        if (starts(i, "\"\"\"")) {
          st = kNormal, i += 2, col += 2;
        } else if (c == '\\' && i + 1 < text.size()) {
          size_t j = i + 1;
          ++col;
          if (static_cast<unsigned char>(text[j]) >= 0x80) return at("non-ASCII character after a backslash");
          // Line-ending backslash: toml++ skips the whitespace after it and tests the next character.
          const bool ws = text[j] == ' ' || text[j] == '\t' || text[j] == '\r' || text[j] == '\n';
          while (ws && j < text.size() && (text[j] == ' ' || text[j] == '\t' || text[j] == '\r' || text[j] == '\n')) {
            if (text[j] == '\n') ++line, col = 0;
            ++j, ++col;
          }
          if (ws && j < text.size() && static_cast<unsigned char>(text[j]) >= 0x80)
            return at("non-ASCII character right after a line-ending backslash (unsupported; start the line with an "
                      "ASCII character)");
          i = ws ? j - 1 : j;
          if (ws) --col;
        }
        break;
    }
  }
  return "";
}

toml::table parse_toml(const std::string& text, const std::string& origin) {
  if (const std::string bad = unsafe_toml_text(text); !bad.empty()) throw Error(origin + ":" + bad);
  try {
    return toml::parse(text, origin);
  } catch (const toml::parse_error& e) {
    const auto& src = e.source();
    throw Error(origin + ":" + std::to_string(src.begin.line) + ":" + std::to_string(src.begin.column) +
                ": invalid TOML: " + std::string(e.description()));
  }
}

// A recipe may start with `base = "other.toml"` (path relative to the recipe):
// the base is loaded first and the recipe's keys are merged over it.
toml::table load_with_bases(const std::string& path, int depth) {
  if (depth > 8) throw Error(path + ": 'base' chain deeper than 8 files (a cycle?)");
  if (!fs::exists(path)) throw Error(path + ": config file not found");
  toml::table table = parse_toml(read_file(path), path);
  if (const toml::node* b = table.get("base")) {
    if (!b->is_string()) throw Error(path + ": key 'base': expected a string (path of a base recipe)");
    fs::path base_path = fs::path(path).parent_path() / b->as_string()->get();
    toml::table merged = load_with_bases(base_path.lexically_normal().string(), depth + 1);
    table.erase("base");
    merge_into(merged, table);
    return merged;
  }
  return table;
}

void apply_override(toml::table& root, const std::string& spec, Origin& origin) {
  const auto eq = spec.find('=');
  if (eq == std::string::npos || eq == 0)
    throw Error("--set " + spec + ": expected section.key=value");
  std::string key = spec.substr(0, eq), value = spec.substr(eq + 1);
  // Parse the value as TOML; a bare word that is not valid TOML is a string.
  toml::table parsed;
  try {
    if (!unsafe_toml_text("v = " + value).empty()) throw std::invalid_argument("not TOML");
    parsed = toml::parse("v = " + value);
  } catch (const std::exception&) {  // toml::parse_error, or text toml++ must not see
    parsed = toml::table{{"v", value}};
  }
  toml::table* t = &root;
  std::string::size_type start = 0, dot;
  while ((dot = key.find('.', start)) != std::string::npos) {
    std::string part = key.substr(start, dot - start);
    toml::node* n = t->get(part);
    if (!n) {
      t->insert(part, toml::table{});
      n = t->get(part);
    }
    if (!n->is_table()) throw Error("--set " + spec + ": '" + key.substr(0, dot) + "' is not a section");
    t = n->as_table();
    start = dot + 1;
  }
  t->insert_or_assign(key.substr(start), *parsed.get("v"));
  origin.overridden.insert(key);
}

void validate_prep(const DataPrepConfig& c, const std::string& origin) {
  const auto& k = c.corpora;
  if (k.names.size() != k.inputs.size())
    throw Error(origin + ": key 'corpora.inputs': expected one input per name (" + std::to_string(k.names.size()) +
                "), got " + std::to_string(k.inputs.size()));
  if (k.names.empty()) throw Error(origin + ": key 'corpora.names': lists no corpus");
  std::set<std::string> seen;
  for (const auto& n : k.names)
    if (!seen.insert(n).second) throw Error(origin + ": key 'corpora.names': duplicate name \"" + n + "\"");
}
void validate_any(const Config& c, const std::string& origin) { validate(c, origin); }
void validate_any(const DataPrepConfig& c, const std::string& origin) { validate_prep(c, origin); }

template <class C>
C build(toml::table table, Origin origin, const std::vector<std::string>& overrides) {
  for (const auto& o : overrides) apply_override(table, o, origin);
  C cfg;
  Reader reader(table, "", origin);
  cfg.visit(reader);
  reader.finish();
  validate_any(cfg, origin.file);
  return cfg;
}

template <class C>
std::string print_toml(const C& cfg) {
  std::ostringstream os;
  os << "# moecpt effective config: every key, defaults included.\n";
  Writer w(os);
  const_cast<C&>(cfg).visit(w);
  return os.str();
}

}  // namespace

void validate(const Config& c, const std::string& origin) {
  auto fail = [&](const std::string& key, const std::string& what) {
    throw Error(origin + ": key '" + key + "': " + what);
  };
  const auto& m = c.model;
  if (m.d_model % m.n_heads != 0)
    fail("model.n_heads", "must divide model.d_model (" + std::to_string(m.d_model) + "), got " +
                              std::to_string(m.n_heads));
  if ((m.d_model / m.n_heads) % 2 != 0)
    fail("model.n_heads", "head dimension d_model/n_heads must be even for RoPE, got " +
                              std::to_string(m.d_model / m.n_heads));
  if (m.ffn == "moe") {
    if (m.n_experts < 1) fail("model.n_experts", "an MoE model needs at least 1 routed expert");
    if (m.top_k > m.n_experts)
      fail("model.top_k", "expected top_k <= n_experts (" + std::to_string(m.n_experts) + "), got " +
                              std::to_string(m.top_k));
    if (m.expert_hidden < 1) fail("model.expert_hidden", "an MoE model needs expert_hidden >= 1");
  }
  if (c.run.residual_dtype == "bfloat16" && c.run.dtype != "bfloat16")
    fail("run.residual_dtype", "bfloat16 needs run.dtype = \"bfloat16\" (the stream is cast only under bf16 autocast)");
  if (c.optim.min_lr > c.optim.lr) fail("optim.min_lr", "expected min_lr <= lr");
  if (c.train.micro_batch_size > 0 && c.train.batch_size % c.train.micro_batch_size != 0)
    fail("train.micro_batch_size", "must divide train.batch_size (" + std::to_string(c.train.batch_size) + "), got " +
                                       std::to_string(c.train.micro_batch_size));
  const auto& sc = c.schedule;
  if (sc.type == "infinite") {
    if (sc.const_lr > c.optim.lr || sc.const_lr < c.optim.min_lr)
      fail("schedule.const_lr", "expected min_lr <= const_lr <= lr");
    if (sc.start == "warmup" && sc.cooldown_end_fraction < sc.warmup_fraction)
      fail("schedule.cooldown_end_fraction", "must not end before the warmup (warmup_fraction)");
    if (sc.start == "warmup" && sc.cooldown_end_fraction + sc.anneal_fraction > 1.0 + 1e-12)
      fail("schedule.anneal_fraction", "the anneal overlaps the cooldown: cooldown_end_fraction + anneal_fraction > 1");
  }
  if (sc.type == "wsd" && sc.warmup_fraction + sc.decay_fraction > 1.0 + 1e-12)
    fail("schedule.decay_fraction", "warmup_fraction + decay_fraction > 1");
  const auto& d = c.data;
  if (!d.train_weights.empty()) {
    if (d.train_weights.size() != d.train.size())
      fail("data.train_weights", "expected one weight per entry of data.train (" +
                                     std::to_string(d.train.size()) + "), got " +
                                     std::to_string(d.train_weights.size()));
    for (double w : d.train_weights)
      if (!(w > 0)) fail("data.train_weights", "weights must be > 0");
  }
  if (d.replay_fraction > 0 && d.replay.empty())
    fail("data.replay_fraction", "is > 0 but data.replay lists no dataset to replay");
  if (d.replay_fraction < 1 && d.train.empty())
    fail("data.train", "lists no dataset (only allowed with replay_fraction = 1)");
}

Config parse_config(const std::string& toml_text, const std::string& origin,
                    const std::vector<std::string>& overrides) {
  return build<Config>(parse_toml(toml_text, origin), Origin{origin, {}}, overrides);
}

Config load_config(const std::string& path, const std::vector<std::string>& overrides) {
  return build<Config>(load_with_bases(path, 0), Origin{path, {}}, overrides);
}

DataPrepConfig load_data_prep_config(const std::string& path, const std::vector<std::string>& overrides) {
  return build<DataPrepConfig>(load_with_bases(path, 0), Origin{path, {}}, overrides);
}

std::string to_toml(const DataPrepConfig& cfg) { return print_toml(cfg); }

std::string to_toml(const Config& cfg) { return print_toml(cfg); }

void write_effective_config(const Config& cfg, const std::string& path) {
  write_file_atomic(path, to_toml(cfg));
}

}  // namespace moecpt

// The sentencepiece plugin (see src/data/spm_shim.h for why it exists).
// Compiled into libmoecpt_spm.so, the only target that links sentencepiece.
// It is loaded into its own link-map namespace, with its own C and C++
// runtimes, so its interface is plain C and no memory changes hands: callers
// pass buffers in, results are copied out.
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <cstring>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

class LineIterator : public sentencepiece::SentenceIterator {
 public:
  LineIterator(const char* const* lines, const size_t* lens, size_t n) : lines_(lines), lens_(lens), n_(n) { load(); }
  bool done() const override { return i_ >= n_; }
  void Next() override {
    ++i_;
    load();
  }
  const std::string& value() const override { return current_; }
  sentencepiece::util::Status status() const override { return {}; }

 private:
  void load() {
    if (i_ < n_) current_.assign(lines_[i_], lens_[i_]);
  }
  const char* const* lines_;
  const size_t* lens_;
  size_t n_;
  size_t i_ = 0;
  std::string current_;
};

void set_error(char* err, size_t cap, const std::string& msg) {
  if (!err || cap == 0) return;
  const size_t n = std::min(cap - 1, msg.size());
  std::memcpy(err, msg.data(), n);
  err[n] = '\0';
}

}  // namespace

extern "C" {

// No C++ exception may leave the plugin: it has its own C++ runtime (its own
// link-map namespace), so the caller could not catch it and would abort. Some
// hostile model files make sentencepiece throw (e.g. Darts' trie builder on
// duplicate or empty pieces; found by fuzz/fuzz_tokenizer.cpp).
#define MOECPT_SPM_GUARD(fail_value)                               \
  catch (const std::exception& e) {                                \
    set_error(err, errcap, std::string("sentencepiece: ") + e.what()); \
    return fail_value;                                             \
  }                                                                \
  catch (...) {                                                    \
    set_error(err, errcap, "sentencepiece: unknown exception");     \
    return fail_value;                                             \
  }

void* moecpt_spm_load(const char* path, char* err, size_t errcap) {
  sentencepiece::SentencePieceProcessor* sp = nullptr;
  try {
    sp = new sentencepiece::SentencePieceProcessor();
    auto status = sp->Load(path);
    if (!status.ok()) {
      set_error(err, errcap, status.ToString());
      delete sp;
      return nullptr;
    }
    return sp;
  } catch (const std::exception& e) {
    delete sp;
    set_error(err, errcap, std::string("sentencepiece: ") + e.what());
    return nullptr;
  } catch (...) {
    delete sp;
    set_error(err, errcap, "sentencepiece: unknown exception");
    return nullptr;
  }
}

void moecpt_spm_free(void* p) { delete static_cast<sentencepiece::SentencePieceProcessor*>(p); }

// Returns the number of ids (copied when it fits in `cap`), or -1 on error.
long moecpt_spm_encode(void* p, const char* text, size_t len, int* out, size_t cap, char* err, size_t errcap) try {
  std::vector<int> ids;
  auto status = static_cast<sentencepiece::SentencePieceProcessor*>(p)->Encode(std::string(text, len), &ids);
  if (!status.ok()) {
    set_error(err, errcap, status.ToString());
    return -1;
  }
  if (ids.size() <= cap) std::memcpy(out, ids.data(), ids.size() * sizeof(int));
  return long(ids.size());
} MOECPT_SPM_GUARD(-1)

// Returns the number of bytes of the decoded text (copied when it fits), or -1.
long moecpt_spm_decode(void* p, const int* ids, size_t n, char* out, size_t cap, char* err, size_t errcap) try {
  std::string text;
  auto status = static_cast<sentencepiece::SentencePieceProcessor*>(p)->Decode(std::vector<int>(ids, ids + n), &text);
  if (!status.ok()) {
    set_error(err, errcap, status.ToString());
    return -1;
  }
  if (text.size() <= cap) std::memcpy(out, text.data(), text.size());
  return long(text.size());
} MOECPT_SPM_GUARD(-1)

int moecpt_spm_info(void* p, int what) {
  auto* sp = static_cast<sentencepiece::SentencePieceProcessor*>(p);
  return what == 0 ? sp->GetPieceSize() : sp->eos_id();
}

int moecpt_spm_train(const char* const* keys, const char* const* values, size_t n_args, const char* const* lines,
                     const size_t* lens, size_t n_lines, char* err, size_t errcap) try {
  std::unordered_map<std::string, std::string> args;
  for (size_t i = 0; i < n_args; ++i) args[keys[i]] = values[i];
  LineIterator it(lines, lens, n_lines);
  auto status = sentencepiece::SentencePieceTrainer::Train(args, &it);
  if (!status.ok()) set_error(err, errcap, status.ToString());
  return status.ok() ? 1 : 0;
} MOECPT_SPM_GUARD(0)

}  // extern "C"

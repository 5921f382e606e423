// Hostile and broken inputs: every file under fuzz/regressions/<reader>/ (inputs
// the fuzzers once crashed or tripped a sanitizer with, and hand-made hostile
// files) goes through the normal reader and must give a clean moecpt::Error
// naming the file. Then damaged checkpoints, a full disk (RLIMIT_FSIZE) and an
// unwritable output directory: one clear error, the previous checkpoint intact.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/config.h"
#include "core/error.h"
#include "core/safetensors.h"
#include "core/safetensors_format.h"
#include "data/documents.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "model/transformer.h"
#include "test_util.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

namespace moecpt {
namespace {

namespace fs = std::filesystem;

std::vector<std::string> regression_files(const std::string& reader) {
  std::vector<std::string> out;
  const fs::path dir = fs::path(MOECPT_SOURCE_DIR) / "fuzz" / "regressions" / reader;
  if (fs::exists(dir))
    for (const auto& e : fs::directory_iterator(dir))
      if (e.is_regular_file() && e.path().filename() != "README.md") out.push_back(e.path().string());
  std::sort(out.begin(), out.end());
  return out;
}

// `load` must throw a moecpt::Error whose message names `path`.
template <class F>
void expect_clean_error(const std::string& path, F&& load) {
  try {
    load();
    ADD_FAILURE() << path << ": loaded without an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << path << ": not a moecpt::Error: " << e.what();
  }
}

TEST(HostileInputs, FuzzRegressionsGiveCleanErrors) {
  size_t n = 0;
  for (const auto& p : regression_files("safetensors")) {
    expect_clean_error(p, [&] { load_safetensors(p); });
    ++n;
  }
  for (const auto& p : regression_files("shard")) {
    expect_clean_error(p, [&] { Shard::open(p, /*verify=*/true); });
    ++n;
  }
  for (const auto& p : regression_files("config")) {
    expect_clean_error(p, [&] { load_config(p); });
    ++n;
  }
  for (const auto& p : regression_files("documents")) {
    expect_clean_error(p, [&] { read_documents(p); });
    ++n;
  }
  for (const auto& p : regression_files("tokenizer")) {
    expect_clean_error(p, [&] { Tokenizer t(p); });
    ++n;
  }
  EXPECT_GT(n, 0u) << "fuzz/regressions/ holds no inputs";
}

std::string le64(uint64_t v) { return std::string(reinterpret_cast<const char*>(&v), 8); }

// Hand-made hostile safetensors files beyond test_safetensors.cpp: nesting
// bombs and names that would garble messages are refused before any parse
// or allocation.
TEST(HostileInputs, SafetensorsNestingBombAndOddNames) {
  testing::TempDir dir;
  const std::string bomb = dir / "bomb.safetensors";
  const std::string nest = std::string(100000, '[') + std::string(100000, ']');
  testing::write_text(bomb, le64(nest.size()) + nest);
  try {
    load_safetensors(bomb);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(bomb + ": header nests JSON deeper than 64"), std::string::npos) << e.what();
  }
  // Brackets inside strings do not count.
  const std::string ok_hdr = R"({"__metadata__":{"x":"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}})";
  testing::write_text(dir / "ok.safetensors", le64(ok_hdr.size()) + ok_hdr);
  EXPECT_NO_THROW(load_safetensors(dir / "ok.safetensors"));
  // A name with a control character and 65 dimensions.
  std::string shape = "[";
  for (int i = 0; i < 65; ++i) shape += std::string(i ? "," : "") + "1";
  const std::string hdr = "{\"a\\u0001b\":{\"dtype\":\"U8\",\"shape\":" + shape + "],\"data_offsets\":[0,1]}}";
  testing::write_text(dir / "dims.safetensors", le64(hdr.size()) + hdr + "x");
  try {
    load_safetensors(dir / "dims.safetensors");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tensor 'a?b': field 'shape' has 65 dimensions"), std::string::npos)
        << e.what();
  }
}

// Offsets that go backwards are refused even when the shard is opened without
// checksum verification (document() would hand them to the sampler).
TEST(HostileInputs, ShardWithUnorderedOffsetsIsRefusedWithoutVerify) {
  testing::TempDir dir;
  const std::string p = dir / "s.bin";
  write_shard(p, {2, 3, 1, 4, 1}, {0, 3, 5}, 8);
  std::string bytes = testing::read_text(p);
  // Offsets start at 64 + pad8(5 * 2) = 80: make document 0 end at 7 > 5.
  const uint64_t seven = 7;
  std::memcpy(bytes.data() + 80 + 8, &seven, 8);
  testing::write_text(p, bytes);
  expect_clean_error(p, [&] { Shard::open(p, /*verify=*/false); });
  // And copy() refuses ranges whose end overflows.
  write_shard(p, {2, 3, 1, 4, 1}, {0, 3, 5}, 8);
  auto s = Shard::open(p);
  int64_t one = 0;
  expect_clean_error(p, [&] { s->copy(2, ~uint64_t(0), &one); });
}

// toml++ 3.3 has undefined behaviour (__builtin_unreachable) when some
// non-ASCII code points appear where whitespace may be: found by fuzz_config.
// Such text is refused before toml++ sees it; non-ASCII in strings and
// comments still works.
TEST(HostileInputs, ConfigNonAsciiOutsideStringsIsRefusedInsideIsKept) {
  Config c = parse_config("# Grüße · ×\n[run]\nname = \"Grüße × ·\"  # ü ·\n", "t.toml");
  EXPECT_EQ(c.run.name, "Grüße × ·");
  c = parse_config(R"([run]
name = '''
·x\'''
out_dir = """a\"\u00b7"""
)",
                   "t.toml");
  EXPECT_EQ(c.run.name, "·x\\");
  EXPECT_EQ(c.run.out_dir, "a\"·");
  auto error_of = [](const std::string& text) {
    try {
      parse_config(text, "t.toml");
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_EQ(error_of("[run]\nname = \"x\" ×\n"),
            "t.toml:2:12: invalid TOML: non-ASCII character outside a string or comment");
  EXPECT_EQ(error_of("[run]\n·name = \"x\"\n"),
            "t.toml:2:1: invalid TOML: non-ASCII character outside a string or comment");
  EXPECT_NE(error_of("[run]\nname = \"\"\"a \\\n  ·b\"\"\"\n").find("t.toml:3:"), std::string::npos);
  // --set values that toml++ must not see become plain strings.
  testing::TempDir dir;
  testing::write_text(dir / "r.toml", "");
  EXPECT_EQ(load_config(dir / "r.toml", {"run.name=×·"}).run.name, "×·");
}

// --- checkpoints -------------------------------------------------------------

void write_data(const std::string& dir) {
  fs::create_directories(dir);
  for (const char* split : {"train", "val"}) {
    std::vector<uint32_t> toks;
    std::vector<uint64_t> offs = {0};
    for (int doc = 0; doc < 20; ++doc) {
      for (int i = 0; i < 40; ++i) toks.push_back(2 + uint32_t(doc + 5 * i) % 60);
      toks.push_back(1);
      offs.push_back(toks.size());
    }
    write_shard(dir + "/" + split + ".bin", toks, offs, 64);
  }
}

std::string tiny_recipe(const std::string& data_dir) {
  return R"([run]
threads = 1
[model]
vocab_size = 64
d_model = 16
n_layers = 1
n_heads = 2
seq_len = 8
ffn_hidden = 32
[train]
steps = 2
batch_size = 2
log_every = 1000
eval_every = 0
eval_batches = 1
checkpoint_every = 1
keep_last = 3
[data]
shard_dir = ")" + data_dir + R"("
train = ["d0"]
validation = ["d0"]
)";
}

class DamagedCheckpoint : public ::testing::Test {
 protected:
  void SetUp() override {
    write_data(dir_ / "d0");
    testing::write_text(dir_ / "run.toml", tiny_recipe(dir_.path().string()));
    train(cfg({}));  // checkpoints/step-00000001, step-00000002, final
    ckpt_ = latest_checkpoint(dir_ / "run");
    ASSERT_FALSE(ckpt_.empty());
  }
  Config cfg(std::vector<std::string> extra) {
    extra.push_back("run.out_dir=\"" + (dir_ / "run") + "\"");
    return load_config(dir_ / "run.toml", extra);
  }
  // Resume (4 steps) must fail with one moecpt::Error naming `file`.
  std::string resume_error() {
    try {
      TrainOptions o;
      o.resume = true;
      train(cfg({"train.steps=4"}), o);
    } catch (const Error& e) {
      return e.what();
    } catch (const std::exception& e) {
      return std::string("not a moecpt::Error: ") + e.what();
    }
    return "no error";
  }
  void damage(const std::string& file, const std::function<void(std::string&)>& f) {
    std::string bytes = testing::read_text(file);
    f(bytes);
    testing::write_text(file, bytes);
  }
  testing::TempDir dir_;
  std::string ckpt_;
};

TEST_F(DamagedCheckpoint, TruncatedOrFlippedWeightsAreNamed) {
  const std::string w = ckpt_ + "/model.safetensors";
  const std::string good = testing::read_text(w);
  damage(w, [](std::string& b) { b.resize(b.size() - 5); });
  std::string e = resume_error();
  EXPECT_EQ(e.rfind(w + ": ", 0), 0u) << e;
  EXPECT_NE(e.find("truncated"), std::string::npos) << e;
  testing::write_text(w, good);
  damage(w, [](std::string& b) { b[b.size() - 3] ^= 0x10; });  // one bit in the last tensor
  e = resume_error();
  EXPECT_EQ(e.rfind(w + ": checksum mismatch: the weights are corrupted", 0), 0u) << e;
}

TEST_F(DamagedCheckpoint, TruncatedOrGarbageOptimizerIsNamed) {
  const std::string o = ckpt_ + "/optimizer.pt";
  const std::string good = testing::read_text(o);
  damage(o, [](std::string& b) { b.resize(b.size() / 2); });
  std::string e = resume_error();
  EXPECT_EQ(e.rfind(o + ": cannot load optimizer state", 0), 0u) << e;
  testing::write_text(o, "not a zip archive");
  e = resume_error();
  EXPECT_EQ(e.rfind(o + ": cannot load optimizer state", 0), 0u) << e;
}

TEST_F(DamagedCheckpoint, TruncatedOrIncompleteTrainerStateIsNamed) {
  const std::string t = ckpt_ + "/trainer.json";
  const std::string good = testing::read_text(t);
  damage(t, [](std::string& b) { b.resize(b.size() / 2); });
  std::string e = resume_error();
  EXPECT_EQ(e.rfind(t + ": invalid trainer state", 0), 0u) << e;
  auto j = nlohmann::json::parse(good);
  j.erase("step");
  testing::write_text(t, j.dump());
  e = resume_error();
  EXPECT_EQ(e.rfind(t + ": invalid trainer state: field 'step'", 0), 0u) << e;
  j = nlohmann::json::parse(good);
  j["sampler"]["cursor"] = "x";
  testing::write_text(t, j.dump());
  e = resume_error();
  EXPECT_EQ(e.rfind(t + ": invalid trainer state: field 'sampler'", 0), 0u) << e;
}

TEST_F(DamagedCheckpoint, WrongShapeForTheConfigIsNamed) {
  // Weights of another width under the same names: caught against the config.
  const std::string w = ckpt_ + "/model.safetensors";
  auto f = load_safetensors(w);
  std::vector<std::pair<std::string, torch::Tensor>> ts;
  for (const auto& n : f.order) ts.emplace_back(n, n == f.order.front() ? torch::zeros({3, 3}) : f.tensors[n]);
  save_safetensors(w, ts);
  const std::string e = resume_error();
  EXPECT_EQ(e.rfind(w + ": tensor '" + f.order.front() + "' has shape [3, 3] but the model expects", 0), 0u) << e;
}

// --- full disk, unwritable output ------------------------------------------

struct Child {
  int exit_code = -1;
  std::string output;
};

// Run `moecpt args...` with RLIMIT_FSIZE = `max_file_bytes` (a disk that is
// full for any file beyond that size: writes fail with EFBIG) and SIGXFSZ
// ignored, as on a full disk the write just fails.
Child run_with_file_limit(const std::vector<std::string>& args, rlim_t max_file_bytes, const std::string& log) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    FILE* f = std::freopen(log.c_str(), "w", stdout);
    if (f) ::dup2(::fileno(stdout), 2);
    ::signal(SIGXFSZ, SIG_IGN);  // kept across exec
    rlimit lim{max_file_bytes, max_file_bytes};
    ::setrlimit(RLIMIT_FSIZE, &lim);
    std::vector<char*> argv{const_cast<char*>(MOECPT_BINARY)};
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv(MOECPT_BINARY, argv.data());
    ::_exit(127);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  Child c;
  c.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  c.output = testing::read_text(log);
  return c;
}

TEST_F(DamagedCheckpoint, DiskFullDuringCheckpointKeepsThePreviousOne) {
  const std::string weights_before = testing::read_text(ckpt_ + "/model.safetensors");
  const std::string out = dir_ / "run";
  // Big enough for config.toml and metrics.jsonl, too small for the weights.
  const rlim_t limit = 8 * 1024;
  ASSERT_GT(weights_before.size(), limit);
  Child c = run_with_file_limit({"train", "-c", dir_ / "run.toml", "--set", "run.out_dir=\"" + out + "\"", "--set",
                                 "train.steps=4", "--resume"},
                                limit, dir_ / "full.log");
  EXPECT_EQ(c.exit_code, 1) << c.output;
  // One clear error: the file being written and the OS reason.
  EXPECT_NE(c.output.find("error: " + out + "/checkpoints/step-00000003.tmp/model.safetensors: cannot write: File too large"),
            std::string::npos)
      << c.output;
  // The previous checkpoint is intact and still the resume point; no half-written one appeared.
  EXPECT_EQ(latest_checkpoint(out), ckpt_);
  EXPECT_EQ(testing::read_text(ckpt_ + "/model.safetensors"), weights_before);
  EXPECT_FALSE(fs::exists(out + "/checkpoints/step-00000003"));
  EXPECT_FALSE(fs::exists(out + "/checkpoints/step-00000003.tmp"));
  Config c2 = load_config(ckpt_ + "/config.toml");
  model::Transformer m(c2.model, c2.router);
  EXPECT_NO_THROW(load_model_weights(ckpt_, *m));
  // With space again, the same command finishes the run.
  auto r = testing::run_moecpt("train -c " + (dir_ / "run.toml") + " --set run.out_dir=\"" + out +
                               "\" --set train.steps=4 --resume");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(fs::exists(out + "/checkpoints/final/model.safetensors"));
}

TEST(HostileInputs, UnwritableOutputDirectoryIsOneClearError) {
  testing::TempDir dir;
  write_data(dir / "d0");
  testing::write_text(dir / "run.toml", tiny_recipe(dir.path().string()));
  // A path below a regular file cannot be created, even by root.
  testing::write_text(dir / "file", "x");
  const std::string out = dir / "file/run";
  auto r = testing::run_moecpt("train -c " + (dir / "run.toml") + " --set run.out_dir=\"" + out + "\"");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("error: " + out + "/checkpoints: cannot create directory: Not a directory"),
            std::string::npos)
      << r.output;
  // Same for a checkpoint directory that cannot be created: nothing else is touched.
  EXPECT_EQ(testing::read_text(dir / "file"), "x");
}

}  // namespace
}  // namespace moecpt

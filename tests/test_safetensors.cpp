#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/error.h"
#include "test_util.h"
#include "core/safetensors.h"

namespace fs = std::filesystem;
using moecpt::Error;

namespace {

class SafetensorsTest : public ::testing::Test {
 protected:
  // A fresh, empty directory per test (tests/test_util.h), removed afterwards.
  moecpt::testing::TempDir tmp_;
  fs::path dir_ = tmp_.path();

  std::string p(const std::string& name) const { return (dir_ / name).string(); }
  std::vector<std::string> entries() const {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(dir_)) out.push_back(e.path().filename().string());
    std::sort(out.begin(), out.end());
    return out;
  }
};

using moecpt::testing::read_text;

void spit(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string le64(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return s;
}

uint64_t read_le64(const std::string& s) {
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<unsigned char>(s[i])) << (8 * i);
  return n;
}

// A safetensors file as another tool would write it: no padding, any key order.
std::string make_file(const std::string& header, const std::string& data) {
  return le64(header.size()) + header + data;
}

std::string raw_bytes(const torch::Tensor& t) {
  torch::Tensor c = t.contiguous();
  return std::string(static_cast<const char*>(c.data_ptr()),
                     static_cast<size_t>(c.numel() * c.element_size()));
}

template <typename T>
std::string bytes_of(std::initializer_list<T> values) {
  std::string s;
  for (T v : values) s.append(reinterpret_cast<const char*>(&v), sizeof(T));
  return s;
}

// Message of the moecpt::Error thrown by loading `path` ("" + failure if none).
std::string load_error(const std::string& path) {
  try {
    moecpt::load_safetensors(path);
  } catch (const Error& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected moecpt::Error, got other exception: " << e.what();
    return {};
  }
  ADD_FAILURE() << "expected moecpt::Error loading " << path;
  return {};
}

#define EXPECT_HAS(msg, needle) \
  EXPECT_NE((msg).find(needle), std::string::npos) << "message: " << (msg) << "\nmissing: " << (needle)

std::vector<std::pair<std::string, torch::Tensor>> sample_tensors() {
  torch::manual_seed(7);
  torch::Tensor f32 = torch::randn({3, 4});
  f32[0][0] = std::numeric_limits<float>::quiet_NaN();
  f32[0][1] = -0.0f;
  f32[0][2] = std::numeric_limits<float>::infinity();
  return {
      {"model.w_f32", f32},
      {"model.w_bf16", torch::randn({5, 2}).to(torch::kBFloat16)},
      {"w_f16", torch::randn({7}).to(torch::kFloat16)},
      {"w_f64", torch::randn({2, 2, 2}, torch::kFloat64)},
      {"step_i64", torch::tensor({int64_t{-1}, int64_t{1} << 40, int64_t{3}})},
      {"i32", torch::arange(6, torch::kInt32).reshape({2, 3})},
      {"i16", torch::tensor({-3, 300}, torch::kInt16)},
      {"u8", torch::tensor({0, 255, 17}, torch::kUInt8)},
      {"i8", torch::tensor({-128, 127}, torch::kInt8)},
      {"mask_bool", torch::tensor({true, false, true, true, false})},
      {"scalar0d", torch::tensor(2.5f)},
      {"empty", torch::empty({0, 3})},
      {"transposed", torch::arange(12, torch::kFloat32).reshape({3, 4}).t()},  // non-contiguous
  };
}

const char* dtype_str(torch::Dtype d) {
  switch (d) {
    case torch::kFloat32: return "F32";
    case torch::kBFloat16: return "BF16";
    case torch::kFloat16: return "F16";
    case torch::kFloat64: return "F64";
    case torch::kInt64: return "I64";
    case torch::kInt32: return "I32";
    case torch::kInt16: return "I16";
    case torch::kUInt8: return "U8";
    case torch::kInt8: return "I8";
    case torch::kBool: return "BOOL";
    default: return "?";
  }
}

}  // namespace

TEST_F(SafetensorsTest, RoundTripIsBitExact) {
  auto tensors = sample_tensors();
  std::map<std::string, std::string> meta = {{"format", "pt"}, {"step", "1234"}, {"note", "ü \"q\""}};
  moecpt::save_safetensors(p("m.safetensors"), tensors, meta);
  EXPECT_EQ(entries(), std::vector<std::string>{"m.safetensors"});  // no temp file left

  moecpt::SafetensorsFile f = moecpt::load_safetensors(p("m.safetensors"));
  EXPECT_EQ(f.metadata, meta);
  ASSERT_EQ(f.order.size(), tensors.size());
  ASSERT_EQ(f.tensors.size(), tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& [name, t] = tensors[i];
    SCOPED_TRACE(name);
    EXPECT_EQ(f.order[i], name);
    const torch::Tensor& got = f.tensors.at(name);
    EXPECT_EQ(got.scalar_type(), t.scalar_type());
    EXPECT_EQ(got.sizes(), t.sizes());
    EXPECT_TRUE(got.is_contiguous());
    EXPECT_EQ(raw_bytes(got), raw_bytes(t));  // bit-exact, NaN and -0.0 included
  }
  EXPECT_EQ(f.tensors.at("scalar0d").dim(), 0);
  EXPECT_EQ(f.tensors.at("scalar0d").item<float>(), 2.5f);
  EXPECT_EQ(f.tensors.at("empty").numel(), 0);

  // No tensors, no metadata: a valid file too.
  moecpt::save_safetensors(p("none.safetensors"), {});
  auto g = moecpt::load_safetensors(p("none.safetensors"));
  EXPECT_TRUE(g.tensors.empty());
  EXPECT_TRUE(g.metadata.empty());
  EXPECT_TRUE(g.order.empty());
}

TEST_F(SafetensorsTest, IndependentHeaderParse) {
  auto tensors = sample_tensors();
  moecpt::save_safetensors(p("m.safetensors"), tensors, {{"k", "v"}});
  const std::string file = read_text(p("m.safetensors"));
  ASSERT_GE(file.size(), 8u);
  const uint64_t n = read_le64(file);
  EXPECT_EQ(n % 8, 0u) << "header padded to a multiple of 8";
  ASSERT_LE(8 + n, file.size());
  const std::string header = file.substr(8, n);
  EXPECT_EQ(header.front(), '{');
  // Padding is spaces after the closing brace.
  size_t close = header.find_last_of('}');
  for (size_t i = close + 1; i < header.size(); ++i) EXPECT_EQ(header[i], ' ');

  const nlohmann::json j = nlohmann::json::parse(header);
  ASSERT_TRUE(j.is_object());
  EXPECT_EQ(j.size(), tensors.size() + 1);
  EXPECT_EQ(j.at("__metadata__"), nlohmann::json({{"k", "v"}}));
  const std::string buffer = file.substr(8 + n);
  uint64_t expect_begin = 0;
  for (const auto& [name, t] : tensors) {
    SCOPED_TRACE(name);
    ASSERT_TRUE(j.contains(name));
    const auto& e = j.at(name);
    EXPECT_EQ(e.at("dtype").get<std::string>(), dtype_str(t.scalar_type()));
    EXPECT_EQ(e.at("shape").get<std::vector<int64_t>>(), t.sizes().vec());
    auto offs = e.at("data_offsets").get<std::vector<uint64_t>>();
    ASSERT_EQ(offs.size(), 2u);
    EXPECT_EQ(offs[0], expect_begin) << "tensors laid out contiguously in the given order";
    std::string want = raw_bytes(t);
    EXPECT_EQ(offs[1] - offs[0], want.size());
    ASSERT_LE(offs[1], buffer.size());
    EXPECT_EQ(buffer.substr(offs[0], offs[1] - offs[0]), want);
    expect_begin = offs[1];
  }
  EXPECT_EQ(expect_begin, buffer.size()) << "no trailing bytes";
}

TEST_F(SafetensorsTest, LoadsHandWrittenFile) {
  // Keys deliberately not in offset order, no header padding, metadata last,
  // extra whitespace, as a different writer might produce.
  const std::string data = bytes_of<int64_t>({42}) + bytes_of<float>({1.5f, -2.0f}) +
                           std::string("\x80\x3f\x00\x40", 4) /* bf16 1.0, 2.0 */ +
                           std::string("\x01\x00\x01", 3);
  const std::string header =
      R"({"b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},)"
      R"( "a": {"dtype":"I64","shape":[],"data_offsets":[0,8]},)"
      R"( "c": {"shape": [2, 1], "data_offsets": [16, 20], "dtype": "BF16"},)"
      R"( "z": {"dtype": "BOOL", "shape": [3], "data_offsets": [20, 23]},)"
      R"( "e": {"dtype": "F16", "shape": [0], "data_offsets": [23, 23]},)"
      R"( "__metadata__": {"format": "pt", "source": "hand"}})";
  ASSERT_NE(header.size() % 8, 0u);
  spit(p("hand.safetensors"), make_file(header, data));

  auto f = moecpt::load_safetensors(p("hand.safetensors"));
  EXPECT_EQ(f.order, (std::vector<std::string>{"a", "b", "c", "z", "e"}));
  EXPECT_EQ(f.metadata, (std::map<std::string, std::string>{{"format", "pt"}, {"source", "hand"}}));
  EXPECT_EQ(f.tensors.at("a").dim(), 0);
  EXPECT_EQ(f.tensors.at("a").item<int64_t>(), 42);
  EXPECT_TRUE(torch::equal(f.tensors.at("b"), torch::tensor({1.5f, -2.0f})));
  EXPECT_EQ(f.tensors.at("c").scalar_type(), torch::kBFloat16);
  EXPECT_EQ(f.tensors.at("c").sizes(), (std::vector<int64_t>{2, 1}));
  EXPECT_TRUE(torch::equal(f.tensors.at("c").to(torch::kFloat32),
                           torch::tensor({1.0f, 2.0f}).reshape({2, 1})));
  EXPECT_TRUE(torch::equal(f.tensors.at("z"), torch::tensor({true, false, true})));
  EXPECT_EQ(f.tensors.at("e").scalar_type(), torch::kFloat16);
  EXPECT_EQ(f.tensors.at("e").numel(), 0);

  // "__metadata__": null is accepted as "no metadata".
  spit(p("nullmeta.safetensors"),
       make_file(R"({"__metadata__": null, "x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}})",
                 "\x07"));
  auto g = moecpt::load_safetensors(p("nullmeta.safetensors"));
  EXPECT_TRUE(g.metadata.empty());
  EXPECT_EQ(g.tensors.at("x").item<uint8_t>(), 7);
}

TEST_F(SafetensorsTest, MissingFileNamesPath) {
  std::string msg = load_error(p("nope.safetensors"));
  EXPECT_HAS(msg, p("nope.safetensors"));
  EXPECT_HAS(msg, "does not exist");
}

TEST_F(SafetensorsTest, TruncatedFileAtSeveralPoints) {
  moecpt::save_safetensors(p("good.safetensors"),
                           {{"alpha", torch::randn({4, 4})}, {"beta", torch::randn({10})}});
  const std::string good = read_text(p("good.safetensors"));
  const uint64_t n = read_le64(good);
  const size_t data_start = 8 + n;
  struct Cut {
    size_t len;
    const char* expect;
  };
  const Cut cuts[] = {
      {0, "too short"},
      {5, "too short"},
      {7, "too short"},
      {8, "header length"},
      {8 + n / 2, "header length"},
      {data_start - 1, "header length"},
      {data_start, "tensor 'alpha'"},          // header intact, no data at all
      {data_start + 10, "tensor 'alpha'"},     // inside the first tensor
      {data_start + 64, "tensor 'beta'"},      // exactly after the first tensor
      {good.size() - 1, "tensor 'beta'"},      // one byte short
  };
  for (const Cut& c : cuts) {
    SCOPED_TRACE("truncated to " + std::to_string(c.len));
    std::string path = p("cut_" + std::to_string(c.len) + ".safetensors");
    spit(path, good.substr(0, c.len));
    std::string msg = load_error(path);
    EXPECT_HAS(msg, path);
    EXPECT_HAS(msg, c.expect);
  }
  // The untouched file still loads.
  EXPECT_NO_THROW(moecpt::load_safetensors(p("good.safetensors")));
}

TEST_F(SafetensorsTest, BadHeaderLength) {
  // Absurd (> 100 MB) header length: rejected before any allocation.
  spit(p("absurd.safetensors"), le64(uint64_t{1} << 40) + "{}");
  std::string msg = load_error(p("absurd.safetensors"));
  EXPECT_HAS(msg, p("absurd.safetensors"));
  EXPECT_HAS(msg, "header length");
  EXPECT_HAS(msg, "absurd");

  spit(p("max.safetensors"), le64(~uint64_t{0}) + "{}");
  msg = load_error(p("max.safetensors"));
  EXPECT_HAS(msg, p("max.safetensors"));
  EXPECT_HAS(msg, "header length");

  // Plausible but larger than the file.
  spit(p("long.safetensors"), le64(1000) + "{}      ");
  msg = load_error(p("long.safetensors"));
  EXPECT_HAS(msg, p("long.safetensors"));
  EXPECT_HAS(msg, "header length 1000 exceeds the file size");
}

TEST_F(SafetensorsTest, HeaderNotJsonOrNotObject) {
  struct Case {
    const char* name;
    std::string header;
    const char* expect;
  };
  const Case cases[] = {
      {"garbage", "this is not json", "header is not valid JSON"},
      {"unterminated", R"({"a": {"dtype": "F32")", "header is not valid JSON"},
      {"array", "[1, 2, 3]", "header must be a JSON object"},
      {"number", "12345678", "header must be a JSON object"},
      {"zeros", std::string(16, '\0'), "header is not valid JSON"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    std::string path = p(std::string(c.name) + ".safetensors");
    spit(path, make_file(c.header, ""));
    std::string msg = load_error(path);
    EXPECT_HAS(msg, path);
    EXPECT_HAS(msg, c.expect);
  }
}

TEST_F(SafetensorsTest, CorruptEntriesNameTensorAndField) {
  struct Case {
    const char* name;
    std::string header;
    std::string data;
    std::vector<std::string> expect;
  };
  const std::string four(4, '\0');
  const std::string eight(8, '\0');
  const std::vector<Case> cases = {
      {"not_object", R"({"w": [1, 2]})", "", {"tensor 'w'", "must be an object"}},
      {"missing_dtype", R"({"w": {"shape": [1], "data_offsets": [0, 4]}})", four,
       {"tensor 'w'", "missing field 'dtype'"}},
      {"missing_shape", R"({"w": {"dtype": "F32", "data_offsets": [0, 4]}})", four,
       {"tensor 'w'", "missing field 'shape'"}},
      {"missing_offsets", R"({"w": {"dtype": "F32", "shape": [1]}})", four,
       {"tensor 'w'", "missing field 'data_offsets'"}},
      {"dtype_not_string", R"({"w": {"dtype": 3, "shape": [1], "data_offsets": [0, 4]}})", four,
       {"tensor 'w'", "'dtype' must be a string"}},
      {"bad_dtype", R"({"w": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}})", "x",
       {"tensor 'w'", "'dtype'", "F8_E4M3"}},
      {"bad_dtype_lower", R"({"w": {"dtype": "f32", "shape": [1], "data_offsets": [0, 4]}})", four,
       {"tensor 'w'", "'dtype'", "\"f32\""}},
      {"shape_not_array", R"({"w": {"dtype": "F32", "shape": 4, "data_offsets": [0, 4]}})", four,
       {"tensor 'w'", "'shape' must be an array"}},
      {"shape_float", R"({"w": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}})", four,
       {"tensor 'w'", "'shape' dimension 0", "non-negative integer"}},
      {"shape_string", R"({"w": {"dtype": "F32", "shape": ["1"], "data_offsets": [0, 4]}})", four,
       {"tensor 'w'", "'shape' dimension 0"}},
      {"negative_dim", R"({"w": {"dtype": "F32", "shape": [2, -3], "data_offsets": [0, 4]}})", four,
       {"tensor 'w'", "'shape' dimension 1 is negative"}},
      {"huge_dim", R"({"w": {"dtype": "F32", "shape": [18446744073709551615], "data_offsets": [0, 4]}})",
       four, {"tensor 'w'", "'shape' dimension 0 is too large"}},
      {"overflow_product",
       R"({"w": {"dtype": "F32", "shape": [4294967296, 4294967296, 16], "data_offsets": [0, 4]}})",
       four, {"tensor 'w'", "'shape'", "too large"}},
      {"overflow_with_elemsize",
       R"({"w": {"dtype": "F64", "shape": [2305843009213693952], "data_offsets": [0, 4]}})", four,
       {"tensor 'w'", "'shape'", "too large"}},
      {"larger_than_buffer",
       R"({"w": {"dtype": "F32", "shape": [1099511627776], "data_offsets": [0, 4]}})", four,
       {"tensor 'w'", "'shape' [1099511627776]", "needs 4398046511104 bytes"}},
      {"offsets_not_array", R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": 0}})", four,
       {"tensor 'w'", "'data_offsets'"}},
      {"offsets_three", R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}})", four,
       {"tensor 'w'", "'data_offsets'"}},
      {"offsets_negative", R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}})", four,
       {"tensor 'w'", "'data_offsets'"}},
      {"begin_gt_end", R"({"w": {"dtype": "F32", "shape": [0], "data_offsets": [4, 0]}})", four,
       {"tensor 'w'", "'data_offsets' [4, 0]", "begin > end"}},
      {"end_beyond", R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})", four,
       {"tensor 'w'", "'data_offsets' [4, 8]", "beyond the data buffer"}},
      {"size_mismatch", R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}})", eight,
       {"tensor 'w'", "'data_offsets' [0, 8]", "spans 8 bytes", "needs 4"}},
      {"overlap",
       R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
           "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}})",
       eight, {"tensor 'b'", "overlaps tensor 'a'"}},
      {"same_range",
       R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
           "b": {"dtype": "I32", "shape": [1], "data_offsets": [0, 4]}})",
       four, {"overlaps tensor '"}},
      {"gap",
       R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
           "b": {"dtype": "U8", "shape": [2], "data_offsets": [6, 8]}})",
       eight, {"tensor 'b'", "gap of 2 bytes", "after tensor 'a'"}},
      {"gap_at_start", R"({"b": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}})", four,
       {"tensor 'b'", "gap of 2 bytes"}},
      {"trailing", R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})", eight,
       {"4 trailing bytes", "'a'"}},
      {"trailing_no_tensors", R"({})", four, {"4 trailing bytes"}},
      {"metadata_not_object", R"({"__metadata__": ["x"]})", "", {"'__metadata__'", "object"}},
      {"metadata_value_not_string", R"({"__metadata__": {"step": 12}})", "",
       {"'__metadata__'", "key 'step'", "must be a string"}},
      {"bool_bad_byte", R"({"m": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}})",
       std::string("\x01\x05", 2), {"tensor 'm'", "BOOL", "5"}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    std::string path = p(std::string(c.name) + ".safetensors");
    spit(path, make_file(c.header, c.data));
    std::string msg = load_error(path);
    EXPECT_HAS(msg, path);
    for (const auto& e : c.expect) EXPECT_HAS(msg, e);
  }
}

TEST_F(SafetensorsTest, HugeShapeDoesNotAllocate) {
  // 2^40 x 2^20 F32 elements claimed, 4 bytes present: must fail fast with an
  // Error (not std::bad_alloc / c10::Error).
  spit(p("huge.safetensors"),
       make_file(R"({"emb": {"dtype": "F32", "shape": [1099511627776, 1048576], "data_offsets": [0, 4]}})",
                 std::string(4, '\0')));
  std::string msg = load_error(p("huge.safetensors"));
  EXPECT_HAS(msg, p("huge.safetensors"));
  EXPECT_HAS(msg, "tensor 'emb'");
  EXPECT_HAS(msg, "'shape'");
}

TEST_F(SafetensorsTest, SaveRejectsBadInput) {
  auto save_error = [&](const std::vector<std::pair<std::string, torch::Tensor>>& ts) {
    try {
      moecpt::save_safetensors(p("bad.safetensors"), ts);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    ADD_FAILURE() << "expected moecpt::Error";
    return std::string();
  };
  std::string msg = save_error({{"a", torch::ones({1})}, {"a", torch::ones({1})}});
  EXPECT_HAS(msg, p("bad.safetensors"));
  EXPECT_HAS(msg, "tensor 'a'");
  msg = save_error({{"c", torch::ones({2}, torch::kComplexFloat)}});
  EXPECT_HAS(msg, "tensor 'c'");
  msg = save_error({{"__metadata__", torch::ones({1})}});
  EXPECT_HAS(msg, "__metadata__");
  msg = save_error({{"u", torch::Tensor()}});
  EXPECT_HAS(msg, "tensor 'u'");
  EXPECT_EQ(entries(), std::vector<std::string>{}) << "nothing written on failure";
}

TEST_F(SafetensorsTest, FailedSaveKeepsPreviousFile) {
  moecpt::save_safetensors(p("ckpt.safetensors"), {{"w", torch::arange(4, torch::kFloat32)}});
  const std::string before = read_text(p("ckpt.safetensors"));
  // Block the temp file name so the write fails (works even as root).
  std::string tmp = p("ckpt.safetensors") + ".tmp." + std::to_string(::getpid());
  fs::create_directory(tmp);
  EXPECT_THROW(moecpt::save_safetensors(p("ckpt.safetensors"), {{"w", torch::zeros({8})}}), Error);
  fs::remove(tmp);
  EXPECT_EQ(read_text(p("ckpt.safetensors")), before);
  EXPECT_EQ(entries(), std::vector<std::string>{"ckpt.safetensors"});
  auto f = moecpt::load_safetensors(p("ckpt.safetensors"));
  EXPECT_TRUE(torch::equal(f.tensors.at("w"), torch::arange(4, torch::kFloat32)));
}

TEST_F(SafetensorsTest, CheckTensorMatches) {
  torch::Tensor t = torch::zeros({2, 3});
  EXPECT_NO_THROW(moecpt::check_tensor_matches("m.st", "w", t, {2, 3}, torch::kFloat32));
  try {
    moecpt::check_tensor_matches("m.st", "layers.0.w", t, {3, 2}, torch::kFloat32);
    FAIL() << "expected Error";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "m.st: tensor 'layers.0.w' has shape [2, 3] but the model expects [3, 2]");
  }
  try {
    moecpt::check_tensor_matches("m.st", "s", torch::tensor(0.0f), {1}, torch::kFloat32);
    FAIL() << "expected Error";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "m.st: tensor 's' has shape [] but the model expects [1]");
  }
  try {
    moecpt::check_tensor_matches("m.st", "w", t.to(torch::kBFloat16), {2, 3}, torch::kFloat32);
    FAIL() << "expected Error";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "m.st: tensor 'w' has dtype BF16 but the model expects F32");
  }
}

// The torch-free half of the safetensors reader (src/core/safetensors.h):
// open a file, validate the 8-byte header length and the JSON header against
// the file size, and read a tensor's bytes into caller-provided memory.
//
// It has no LibTorch dependency so that the libFuzzer target
// (fuzz/fuzz_safetensors.cpp) can exercise exactly the code that validates
// untrusted checkpoint files. Every problem is a moecpt::Error of the form
// "<path>: tensor '<name>': <problem>" (or naming the header field).
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace moecpt {

struct SafetensorsTensorInfo {
  std::string name;
  std::string dtype;           // "F32", "BF16", ... (one of safetensors_dtype_names())
  size_t element_size = 0;     // bytes per element
  std::vector<int64_t> shape;  // every dimension >= 0
  uint64_t nbytes = 0;         // product(shape) * element_size (overflow-checked)
  uint64_t begin = 0, end = 0; // data_offsets, relative to the data buffer
};

struct SafetensorsLayout {
  uint64_t file_size = 0;
  uint64_t header_len = 0;
  uint64_t data_start = 0;                     // 8 + header_len
  std::vector<SafetensorsTensorInfo> tensors;  // sorted by data offset; they tile the buffer exactly
  std::map<std::string, std::string> metadata; // "__metadata__"
};

// Every limit the reader enforces before allocating anything.
constexpr uint64_t kSafetensorsMaxHeaderBytes = 100'000'000;  // reference implementation's limit
constexpr int kSafetensorsMaxJsonDepth = 64;  // a real header nests 3 levels

// Bytes per element of a dtype name, or 0 if it is not supported.
size_t safetensors_dtype_size(const std::string& dtype);

// "[2, 3]": a shape as error messages print it.
std::string safetensors_shape_str(const std::vector<int64_t>& shape);

// Validate a header (the JSON text) for a file of `file_size` bytes whose
// header is `header_len` bytes long. Checks, in this order, without
// allocating anything proportional to a claimed size: nesting depth, JSON
// syntax, object shape, every entry's dtype/shape/data_offsets, that each
// tensor fits in the data buffer, and that the tensors tile the buffer
// exactly (no overlap, gap or trailing bytes).
SafetensorsLayout parse_safetensors_header(const std::string& path, const std::string& header_json,
                                           uint64_t file_size);

// Open `path`, check the 8-byte length against the file size, read and
// validate the header. Keeps the file open for read().
class SafetensorsReader {
 public:
  explicit SafetensorsReader(const std::string& path);
  ~SafetensorsReader();
  SafetensorsReader(const SafetensorsReader&) = delete;
  SafetensorsReader& operator=(const SafetensorsReader&) = delete;

  const SafetensorsLayout& layout() const { return layout_; }
  const std::string& path() const { return path_; }
  // Read tensor `t` (t.nbytes bytes) into `dst`; BOOL bytes must be 0 or 1.
  void read(const SafetensorsTensorInfo& t, void* dst) const;

 private:
  std::string path_;
  int fd_ = -1;
  SafetensorsLayout layout_;
};

}  // namespace moecpt

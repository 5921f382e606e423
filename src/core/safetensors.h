// Hugging Face safetensors reader/writer (the checkpoint format of moecpt).
//
// Layout: 8-byte little-endian u64 N, N bytes of UTF-8 JSON header
//   {"<name>": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]},
//    ..., "__metadata__": {"key": "value", ...}}
// then the data buffer; offsets are relative to the start of the buffer.
// The writer pads the header with spaces to a multiple of 8 bytes (as the
// reference implementation does) and lays tensors out contiguously in the
// order given. The reader validates the whole header against the file size
// before allocating anything; every problem is a moecpt::Error of the form
// "<path>: tensor '<name>': <problem>" (or naming the header field).
#pragma once
#include <torch/torch.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

namespace moecpt {

// Write `tensors` (in this order) and string `metadata` to `path` atomically.
// Tensors are detached, moved to CPU and made contiguous. Throws moecpt::Error
// on duplicate/empty/reserved names, unsupported dtypes or I/O failure.
void save_safetensors(const std::string& path,
                      const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

struct SafetensorsFile {
  std::map<std::string, torch::Tensor> tensors;   // CPU, contiguous, owned
  std::map<std::string, std::string> metadata;    // "__metadata__" (may be empty)
  std::vector<std::string> order;                 // names by position in the data buffer
};

SafetensorsFile load_safetensors(const std::string& path);

// Throws "<path>: tensor '<name>' has shape [a, b] but the model expects [c, d]"
// (or "... has dtype BF16 but the model expects F32").
void check_tensor_matches(const std::string& path, const std::string& name,
                          const torch::Tensor& got, at::IntArrayRef expected_shape,
                          torch::Dtype expected);

// "F32", "BF16", ... for a supported dtype; throws moecpt::Error otherwise.
std::string safetensors_dtype_name(torch::Dtype dtype);

}  // namespace moecpt

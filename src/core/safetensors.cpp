#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/safetensors_format.h"

static_assert(std::endian::native == std::endian::little,
              "safetensors I/O assumes a little-endian host");

namespace moecpt {
namespace {

using ojson = nlohmann::ordered_json;

constexpr const char* kMetadataKey = "__metadata__";

// The LibTorch dtype of each safetensors dtype name; element sizes come from
// the torch-free reader (safetensors_dtype_size).
struct DtypeInfo {
  const char* name;
  torch::Dtype dtype;
};

constexpr DtypeInfo kDtypes[] = {
    {"F64", torch::kFloat64}, {"F32", torch::kFloat32}, {"F16", torch::kFloat16}, {"BF16", torch::kBFloat16},
    {"I64", torch::kInt64},   {"I32", torch::kInt32},   {"I16", torch::kInt16},   {"I8", torch::kInt8},
    {"U8", torch::kUInt8},    {"BOOL", torch::kBool},
};

const DtypeInfo* find_dtype(const std::string& name) {
  for (const auto& d : kDtypes)
    if (name == d.name) return &d;
  return nullptr;
}

const DtypeInfo* find_dtype(torch::Dtype dtype) {
  for (const auto& d : kDtypes)
    if (dtype == d.dtype) return &d;
  return nullptr;
}

std::string shape_str(at::IntArrayRef shape) { return safetensors_shape_str(shape.vec()); }

std::string quoted(const std::string& name) { return "tensor '" + name + "'"; }

}  // namespace

std::string safetensors_dtype_name(torch::Dtype dtype) {
  const DtypeInfo* d = find_dtype(dtype);
  if (!d) {
    std::ostringstream os;
    os << dtype;
    throw Error("dtype " + os.str() + " cannot be stored in safetensors");
  }
  return d->name;
}

void save_safetensors(const std::string& path,
                      const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  std::vector<torch::Tensor> cpu;
  cpu.reserve(tensors.size());
  std::set<std::string> seen;
  ojson header = ojson::object();
  if (!metadata.empty()) {
    ojson md = ojson::object();
    for (const auto& [k, v] : metadata) md[k] = v;
    header[kMetadataKey] = std::move(md);
  }
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    const std::string who = quoted(name);
    if (name.empty()) throw file_error(path, "cannot save a tensor with an empty name");
    if (name == kMetadataKey)
      throw file_error(path, "cannot save a tensor named '__metadata__' (reserved)");
    if (!seen.insert(name).second) throw file_error(path, who + " is listed twice");
    if (!t.defined()) throw file_error(path, who + " is undefined");
    if (t.layout() != torch::kStrided)
      throw file_error(path, who + " is not a dense tensor");
    const DtypeInfo* d = find_dtype(t.scalar_type());
    if (!d) {
      std::ostringstream os;
      os << t.scalar_type();
      throw file_error(path, who + " has dtype " + os.str() + ", which safetensors cannot store");
    }
    torch::Tensor c = t.detach().to(torch::kCPU).contiguous();
    uint64_t nbytes = static_cast<uint64_t>(c.numel()) * safetensors_dtype_size(d->name);
    ojson entry = ojson::object();
    entry["dtype"] = d->name;
    entry["shape"] = c.sizes().vec();
    entry["data_offsets"] = {offset, offset + nbytes};
    header[name] = std::move(entry);
    offset += nbytes;
    cpu.push_back(std::move(c));
  }
  std::string hdr;
  try {
    hdr = header.dump();
  } catch (const nlohmann::json::exception& e) {
    throw file_error(path, std::string("cannot encode header (names/metadata must be UTF-8): ") +
                               e.what());
  }
  hdr.append((8 - hdr.size() % 8) % 8, ' ');
  uint64_t n = hdr.size();
  char len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<char>((n >> (8 * i)) & 0xff);

  write_file_atomic(path, [&](std::ostream& os) {
    os.write(len, 8);
    os.write(hdr.data(), static_cast<std::streamsize>(hdr.size()));
    for (const auto& c : cpu) {
      os.write(static_cast<const char*>(c.data_ptr()),
               static_cast<std::streamsize>(c.numel() * c.element_size()));
    }
  });
}

SafetensorsFile load_safetensors(const std::string& path) {
  // Everything is checked against the file size first (safetensors_format.cpp,
  // torch-free so that it can be fuzzed); only then are tensors allocated.
  SafetensorsReader reader(path);
  SafetensorsFile out;
  out.metadata = reader.layout().metadata;
  for (const SafetensorsTensorInfo& e : reader.layout().tensors) {
    const DtypeInfo* d = find_dtype(e.dtype);
    if (!d || safetensors_dtype_size(d->name) != e.element_size)  // both tables list the same dtypes
      throw file_error(path, quoted(e.name) + ": dtype " + e.dtype + " has no LibTorch equivalent");
    torch::Tensor t = torch::empty(e.shape, torch::TensorOptions().dtype(d->dtype));
    reader.read(e, t.data_ptr());
    out.order.push_back(e.name);
    out.tensors.emplace(e.name, std::move(t));
  }
  return out;
}

void check_tensor_matches(const std::string& path, const std::string& name,
                          const torch::Tensor& got, at::IntArrayRef expected_shape,
                          torch::Dtype expected) {
  if (!got.defined()) throw file_error(path, quoted(name) + " is undefined");
  if (got.sizes() != expected_shape)
    throw file_error(path, quoted(name) + " has shape " + shape_str(got.sizes()) +
                               " but the model expects " + shape_str(expected_shape));
  if (got.scalar_type() != expected) {
    auto name_of = [](torch::Dtype d) {
      const DtypeInfo* i = find_dtype(d);
      if (i) return std::string(i->name);
      std::ostringstream os;
      os << d;
      return os.str();
    };
    throw file_error(path, quoted(name) + " has dtype " + name_of(got.scalar_type()) +
                               " but the model expects " + name_of(expected));
  }
}

}  // namespace moecpt

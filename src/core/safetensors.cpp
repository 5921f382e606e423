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

static_assert(std::endian::native == std::endian::little,
              "safetensors I/O assumes a little-endian host");

namespace moecpt {
namespace {

using ojson = nlohmann::ordered_json;

constexpr uint64_t kMaxHeaderBytes = 100'000'000;  // reference implementation's limit
constexpr const char* kMetadataKey = "__metadata__";

struct DtypeInfo {
  const char* name;
  torch::Dtype dtype;
  size_t size;
};

constexpr DtypeInfo kDtypes[] = {
    {"F64", torch::kFloat64, 8}, {"F32", torch::kFloat32, 4}, {"F16", torch::kFloat16, 2},
    {"BF16", torch::kBFloat16, 2}, {"I64", torch::kInt64, 8}, {"I32", torch::kInt32, 4},
    {"I16", torch::kInt16, 2},  {"I8", torch::kInt8, 1},       {"U8", torch::kUInt8, 1},
    {"BOOL", torch::kBool, 1},
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

std::string shape_str(at::IntArrayRef shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

std::string quoted(const std::string& name) { return "tensor '" + name + "'"; }

// JSON value rendered for an error message, truncated so a hostile header
// cannot blow up the message.
std::string brief(const ojson& v) {
  std::string s = v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  if (s.size() > 80) s = s.substr(0, 77) + "...";
  return s;
}

struct Entry {
  std::string name;
  const DtypeInfo* dtype = nullptr;
  std::vector<int64_t> shape;
  uint64_t nbytes = 0;
  uint64_t begin = 0;
  uint64_t end = 0;
  size_t header_index = 0;
};

// pread exactly `size` bytes at `offset`; returns false on a short file.
void pread_all(int fd, const std::string& path, void* dst, uint64_t size, uint64_t offset,
               const std::string& what) {
  char* p = static_cast<char*>(dst);
  while (size > 0) {
    size_t chunk = static_cast<size_t>(std::min<uint64_t>(size, 1u << 30));
    ssize_t n = ::pread(fd, p, chunk, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      throw file_error(path, "cannot read " + what + ": " + std::strerror(err));
    }
    if (n == 0) throw file_error(path, "unexpected end of file while reading " + what);
    p += n;
    size -= static_cast<uint64_t>(n);
    offset += static_cast<uint64_t>(n);
  }
}

struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

Entry parse_entry(const std::string& path, const std::string& name, const ojson& v,
                  uint64_t buffer_size) {
  Entry e;
  e.name = name;
  const std::string who = quoted(name);
  if (!v.is_object())
    throw file_error(path, who + ": header entry must be an object, got " + brief(v));

  // dtype
  auto it = v.find("dtype");
  if (it == v.end()) throw file_error(path, who + ": missing field 'dtype'");
  if (!it->is_string())
    throw file_error(path, who + ": field 'dtype' must be a string, got " + brief(*it));
  e.dtype = find_dtype(it->get<std::string>());
  if (!e.dtype)
    throw file_error(path, who + ": field 'dtype' has unsupported value " + brief(*it) +
                               " (expected F64, F32, F16, BF16, I64, I32, I16, I8, U8 or BOOL)");

  // shape
  it = v.find("shape");
  if (it == v.end()) throw file_error(path, who + ": missing field 'shape'");
  if (!it->is_array())
    throw file_error(path, who + ": field 'shape' must be an array, got " + brief(*it));
  bool has_zero = false;
  for (size_t i = 0; i < it->size(); ++i) {
    const ojson& d = (*it)[i];
    if (d.is_number_unsigned()) {
      uint64_t u = d.get<uint64_t>();
      if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        throw file_error(path, who + ": field 'shape' dimension " + std::to_string(i) +
                                   " is too large (" + std::to_string(u) + ")");
      e.shape.push_back(static_cast<int64_t>(u));
      has_zero |= (u == 0);
    } else if (d.is_number_integer()) {
      throw file_error(path, who + ": field 'shape' dimension " + std::to_string(i) +
                                 " is negative (" + brief(d) + ")");
    } else {
      throw file_error(path, who + ": field 'shape' dimension " + std::to_string(i) +
                                 " must be a non-negative integer, got " + brief(d));
    }
  }
  // Overflow-safe byte size.
  uint64_t nbytes = has_zero ? 0 : e.dtype->size;
  if (!has_zero) {
    for (int64_t d : e.shape) {
      if (__builtin_mul_overflow(nbytes, static_cast<uint64_t>(d), &nbytes) ||
          nbytes > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        throw file_error(path, who + ": field 'shape' " + shape_str(e.shape) +
                                   " is too large (its byte size overflows)");
    }
  }
  e.nbytes = nbytes;
  if (nbytes > buffer_size)
    throw file_error(path, who + ": field 'shape' " + shape_str(e.shape) + " with dtype " +
                               e.dtype->name + " needs " + std::to_string(nbytes) +
                               " bytes but the data buffer has only " +
                               std::to_string(buffer_size));

  // data_offsets
  it = v.find("data_offsets");
  if (it == v.end()) throw file_error(path, who + ": missing field 'data_offsets'");
  if (!it->is_array() || it->size() != 2 || !(*it)[0].is_number_unsigned() ||
      !(*it)[1].is_number_unsigned())
    throw file_error(path, who +
                               ": field 'data_offsets' must be [begin, end] with non-negative "
                               "integers, got " +
                               brief(*it));
  e.begin = (*it)[0].get<uint64_t>();
  e.end = (*it)[1].get<uint64_t>();
  const std::string offs =
      "field 'data_offsets' [" + std::to_string(e.begin) + ", " + std::to_string(e.end) + "]";
  if (e.begin > e.end) throw file_error(path, who + ": " + offs + " has begin > end");
  if (e.end > buffer_size)
    throw file_error(path, who + ": " + offs + " ends beyond the data buffer (" +
                               std::to_string(buffer_size) + " bytes; file truncated?)");
  if (e.end - e.begin != nbytes)
    throw file_error(path, who + ": " + offs + " spans " + std::to_string(e.end - e.begin) +
                               " bytes but shape " + shape_str(e.shape) + " with dtype " +
                               e.dtype->name + " needs " + std::to_string(nbytes));
  return e;
}

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
    uint64_t nbytes = static_cast<uint64_t>(c.numel()) * d->size;
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
  Fd f;
  f.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (f.fd < 0) {
    int err = errno;
    if (err == ENOENT) throw file_error(path, "file does not exist");
    throw file_error(path, std::string("cannot open for reading: ") + std::strerror(err));
  }
  struct stat st {};
  if (::fstat(f.fd, &st) != 0) {
    int err = errno;
    throw file_error(path, std::string("cannot stat: ") + std::strerror(err));
  }
  if (!S_ISREG(st.st_mode)) throw file_error(path, "not a regular file");
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8)
    throw file_error(path, "file is only " + std::to_string(file_size) +
                               " bytes, too short for the 8-byte safetensors header length");

  unsigned char len[8];
  pread_all(f.fd, path, len, 8, 0, "the header length");
  uint64_t header_len = 0;
  for (int i = 0; i < 8; ++i) header_len |= static_cast<uint64_t>(len[i]) << (8 * i);
  if (header_len > kMaxHeaderBytes)
    throw file_error(path, "header length " + std::to_string(header_len) +
                               " is absurd (limit " + std::to_string(kMaxHeaderBytes) +
                               " bytes); not a safetensors file?");
  if (header_len > file_size - 8)
    throw file_error(path, "header length " + std::to_string(header_len) +
                               " exceeds the file size (" + std::to_string(file_size) +
                               " bytes); file truncated?");
  const uint64_t buffer_size = file_size - 8 - header_len;

  std::string hdr(static_cast<size_t>(header_len), '\0');
  pread_all(f.fd, path, hdr.data(), header_len, 8, "the header");
  ojson header;
  try {
    header = ojson::parse(hdr);
  } catch (const nlohmann::json::exception& e) {
    throw file_error(path, std::string("header is not valid JSON: ") + e.what());
  }
  if (!header.is_object())
    throw file_error(path, "header must be a JSON object, got " + brief(header));

  SafetensorsFile out;
  std::vector<Entry> entries;
  entries.reserve(header.size());
  size_t index = 0;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& key = it.key();
    if (key == kMetadataKey) {
      if (it->is_null()) continue;
      if (!it->is_object())
        throw file_error(path, "field '__metadata__' must be an object, got " + brief(*it));
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string())
          throw file_error(path, "field '__metadata__' key '" + m.key() +
                                     "' must be a string, got " + brief(*m));
        out.metadata[m.key()] = m->get<std::string>();
      }
      continue;
    }
    Entry e = parse_entry(path, key, *it, buffer_size);
    e.header_index = index++;
    entries.push_back(std::move(e));
  }

  // The data buffer must be covered exactly: no overlaps, no gaps, no tail.
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    if (a.begin != b.begin) return a.begin < b.begin;
    if (a.end != b.end) return a.end < b.end;
    return a.header_index < b.header_index;
  });
  uint64_t cursor = 0;
  const Entry* prev = nullptr;
  for (const Entry& e : entries) {
    if (e.begin < cursor)
      throw file_error(path, quoted(e.name) + ": field 'data_offsets' [" +
                                 std::to_string(e.begin) + ", " + std::to_string(e.end) +
                                 "] overlaps tensor '" + prev->name + "' [" +
                                 std::to_string(prev->begin) + ", " + std::to_string(prev->end) +
                                 "]");
    if (e.begin > cursor)
      throw file_error(path, quoted(e.name) + ": field 'data_offsets' [" +
                                 std::to_string(e.begin) + ", " + std::to_string(e.end) +
                                 "] leaves a gap of " + std::to_string(e.begin - cursor) +
                                 " bytes after " +
                                 (prev ? "tensor '" + prev->name + "'" : std::string("the header")) +
                                 " (byte " + std::to_string(cursor) + " of the data buffer)");
    cursor = e.end;
    prev = &e;
  }
  if (cursor != buffer_size)
    throw file_error(path, std::to_string(buffer_size - cursor) +
                               " trailing bytes after the last tensor" +
                               (prev ? " ('" + prev->name + "')" : std::string()) +
                               " in the data buffer");

  // Everything checked against the file size: now allocate and read.
  const uint64_t data_start = 8 + header_len;
  for (const Entry& e : entries) {
    torch::Tensor t = torch::empty(e.shape, torch::TensorOptions().dtype(e.dtype->dtype));
    if (e.nbytes > 0)
      pread_all(f.fd, path, t.data_ptr(), e.nbytes, data_start + e.begin, quoted(e.name));
    if (e.dtype->dtype == torch::kBool) {
      const auto* b = static_cast<const unsigned char*>(t.data_ptr());
      for (uint64_t i = 0; i < e.nbytes; ++i)
        if (b[i] > 1)
          throw file_error(path, quoted(e.name) + ": BOOL element " + std::to_string(i) +
                                     " has byte value " + std::to_string(b[i]) +
                                     " (must be 0 or 1)");
    }
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

#include "core/safetensors_format.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>

#include "core/error.h"

static_assert(std::endian::native == std::endian::little,
              "safetensors I/O assumes a little-endian host");

namespace moecpt {
namespace {

using ojson = nlohmann::ordered_json;
constexpr const char* kMetadataKey = "__metadata__";

struct DtypeSize {
  const char* name;
  size_t size;
};
constexpr DtypeSize kDtypeSizes[] = {{"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8},
                                     {"I32", 4}, {"I16", 2}, {"I8", 1},  {"U8", 1},   {"BOOL", 1}};

std::string shape_str(const std::vector<int64_t>& shape) { return safetensors_shape_str(shape); }

std::string quoted(const std::string& name) { return "tensor '" + name + "'"; }

// JSON value rendered for an error message, truncated so a hostile header
// cannot blow up the message (values are at most kSafetensorsMaxJsonDepth deep).
std::string brief(const ojson& v) {
  std::string s = v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  if (s.size() > 80) s = s.substr(0, 77) + "...";
  return s;
}

// Names come from the file: keep error messages printable and short.
std::string printable(const std::string& name) {
  std::string s;
  for (unsigned char c : name.substr(0, 200)) s += (c < 0x20 || c == 0x7f) ? '?' : char(c);
  return name.size() > 200 ? s + "..." : s;
}

// Deepest bracket nesting of a JSON text (outside strings). Checked before
// parsing: nlohmann's dump() and destructor recurse, so a header of a million
// '[' would overflow the stack.
int json_depth(const std::string& text) {
  int depth = 0, max_depth = 0;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
      continue;
    }
    if (c == '"') in_string = true;
    else if (c == '[' || c == '{') max_depth = std::max(max_depth, ++depth);
    else if (c == ']' || c == '}') --depth;
    if (max_depth > kSafetensorsMaxJsonDepth) break;
  }
  return max_depth;
}

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

SafetensorsTensorInfo parse_entry(const std::string& path, const std::string& name, const ojson& v,
                                  uint64_t buffer_size) {
  SafetensorsTensorInfo e;
  e.name = name;
  const std::string who = quoted(printable(name));
  if (name.empty()) throw file_error(path, "a tensor has an empty name");
  if (!v.is_object())
    throw file_error(path, who + ": header entry must be an object, got " + brief(v));

  // dtype
  auto it = v.find("dtype");
  if (it == v.end()) throw file_error(path, who + ": missing field 'dtype'");
  if (!it->is_string())
    throw file_error(path, who + ": field 'dtype' must be a string, got " + brief(*it));
  e.dtype = it->get<std::string>();
  e.element_size = safetensors_dtype_size(e.dtype);
  if (e.element_size == 0)
    throw file_error(path, who + ": field 'dtype' has unsupported value " + brief(*it) +
                               " (expected F64, F32, F16, BF16, I64, I32, I16, I8, U8 or BOOL)");

  // shape
  it = v.find("shape");
  if (it == v.end()) throw file_error(path, who + ": missing field 'shape'");
  if (!it->is_array())
    throw file_error(path, who + ": field 'shape' must be an array, got " + brief(*it));
  if (it->size() > 64)
    throw file_error(path, who + ": field 'shape' has " + std::to_string(it->size()) +
                               " dimensions (at most 64 supported)");
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
  // Overflow-safe byte size (also bounds the element count for int64 numel()).
  uint64_t nbytes = has_zero ? 0 : e.element_size;
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
    throw file_error(path, who + ": field 'shape' " + shape_str(e.shape) + " with dtype " + e.dtype +
                               " needs " + std::to_string(nbytes) +
                               " bytes but the data buffer has only " + std::to_string(buffer_size));

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
                               " bytes but shape " + shape_str(e.shape) + " with dtype " + e.dtype +
                               " needs " + std::to_string(nbytes));
  return e;
}

}  // namespace

std::string safetensors_shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

size_t safetensors_dtype_size(const std::string& dtype) {
  for (const auto& d : kDtypeSizes)
    if (dtype == d.name) return d.size;
  return 0;
}

SafetensorsLayout parse_safetensors_header(const std::string& path, const std::string& hdr,
                                           uint64_t file_size) {
  if (file_size < 8 || hdr.size() > file_size - 8)
    throw file_error(path, "header length " + std::to_string(hdr.size()) + " exceeds the file size (" +
                               std::to_string(file_size) + " bytes); file truncated?");
  SafetensorsLayout out;
  out.file_size = file_size;
  out.header_len = hdr.size();
  out.data_start = 8 + hdr.size();
  const uint64_t buffer_size = file_size - out.data_start;

  if (json_depth(hdr) > kSafetensorsMaxJsonDepth)
    throw file_error(path, "header nests JSON deeper than " + std::to_string(kSafetensorsMaxJsonDepth) +
                               " levels; not a safetensors header");
  ojson header;
  try {
    header = ojson::parse(hdr);
  } catch (const nlohmann::json::exception& e) {
    throw file_error(path, std::string("header is not valid JSON: ") + e.what());
  }
  if (!header.is_object())
    throw file_error(path, "header must be a JSON object, got " + brief(header));

  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& key = it.key();
    if (key == kMetadataKey) {
      if (it->is_null()) continue;
      if (!it->is_object())
        throw file_error(path, "field '__metadata__' must be an object, got " + brief(*it));
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string())
          throw file_error(path, "field '__metadata__' key '" + printable(m.key()) +
                                     "' must be a string, got " + brief(*m));
        out.metadata[m.key()] = m->get<std::string>();
      }
      continue;
    }
    out.tensors.push_back(parse_entry(path, key, *it, buffer_size));
  }

  // The data buffer must be covered exactly: no overlaps, no gaps, no tail.
  std::stable_sort(out.tensors.begin(), out.tensors.end(),
                   [](const SafetensorsTensorInfo& a, const SafetensorsTensorInfo& b) {
                     return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
                   });
  uint64_t cursor = 0;
  const SafetensorsTensorInfo* prev = nullptr;
  for (const auto& e : out.tensors) {
    const std::string offs =
        "field 'data_offsets' [" + std::to_string(e.begin) + ", " + std::to_string(e.end) + "]";
    if (e.begin < cursor)
      throw file_error(path, quoted(printable(e.name)) + ": " + offs + " overlaps tensor '" +
                                 printable(prev->name) + "' [" + std::to_string(prev->begin) + ", " +
                                 std::to_string(prev->end) + "]");
    if (e.begin > cursor)
      throw file_error(path, quoted(printable(e.name)) + ": " + offs + " leaves a gap of " +
                                 std::to_string(e.begin - cursor) + " bytes after " +
                                 (prev ? "tensor '" + printable(prev->name) + "'" : std::string("the header")) +
                                 " (byte " + std::to_string(cursor) + " of the data buffer)");
    cursor = e.end;
    prev = &e;
  }
  if (cursor != buffer_size)
    throw file_error(path, std::to_string(buffer_size - cursor) + " trailing bytes after the last tensor" +
                               (prev ? " ('" + printable(prev->name) + "')" : std::string()) +
                               " in the data buffer");
  return out;
}

SafetensorsReader::SafetensorsReader(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) {
    int err = errno;
    if (err == ENOENT) throw file_error(path, "file does not exist");
    throw file_error(path, std::string("cannot open for reading: ") + std::strerror(err));
  }
  try {
    struct stat st {};
    if (::fstat(fd_, &st) != 0) {
      int err = errno;
      throw file_error(path, std::string("cannot stat: ") + std::strerror(err));
    }
    if (!S_ISREG(st.st_mode)) throw file_error(path, "not a regular file");
    const uint64_t file_size = static_cast<uint64_t>(st.st_size);
    if (file_size < 8)
      throw file_error(path, "file is only " + std::to_string(file_size) +
                                 " bytes, too short for the 8-byte safetensors header length");
    unsigned char len[8];
    pread_all(fd_, path, len, 8, 0, "the header length");
    uint64_t header_len = 0;
    for (int i = 0; i < 8; ++i) header_len |= static_cast<uint64_t>(len[i]) << (8 * i);
    if (header_len > kSafetensorsMaxHeaderBytes)
      throw file_error(path, "header length " + std::to_string(header_len) + " is absurd (limit " +
                                 std::to_string(kSafetensorsMaxHeaderBytes) +
                                 " bytes); not a safetensors file?");
    if (header_len > file_size - 8)
      throw file_error(path, "header length " + std::to_string(header_len) + " exceeds the file size (" +
                                 std::to_string(file_size) + " bytes); file truncated?");
    std::string hdr(static_cast<size_t>(header_len), '\0');
    pread_all(fd_, path, hdr.data(), header_len, 8, "the header");
    layout_ = parse_safetensors_header(path, hdr, file_size);
  } catch (...) {
    ::close(fd_);
    throw;
  }
}

SafetensorsReader::~SafetensorsReader() {
  if (fd_ >= 0) ::close(fd_);
}

void SafetensorsReader::read(const SafetensorsTensorInfo& t, void* dst) const {
  if (t.nbytes == 0) return;
  if (t.end > layout_.file_size - layout_.data_start || t.end - t.begin != t.nbytes)
    throw file_error(path_, quoted(printable(t.name)) + ": not a tensor of this file's layout");
  pread_all(fd_, path_, dst, t.nbytes, layout_.data_start + t.begin, quoted(printable(t.name)));
  if (t.dtype == "BOOL") {
    const auto* b = static_cast<const unsigned char*>(dst);
    for (uint64_t i = 0; i < t.nbytes; ++i)
      if (b[i] > 1)
        throw file_error(path_, quoted(printable(t.name)) + ": BOOL element " + std::to_string(i) +
                                    " has byte value " + std::to_string(b[i]) + " (must be 0 or 1)");
  }
}

}  // namespace moecpt

#include "data/shard.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "core/atomic_file.h"
#include "core/error.h"

namespace moecpt {
namespace {

constexpr char kMagic[8] = {'M', 'O', 'E', 'C', 'P', 'T', 'S', 'H'};
constexpr uint32_t kVersion = 1;
constexpr size_t kHeaderBytes = 64;

template <class T>
void put(std::string& buf, size_t at, T v) {
  std::memcpy(buf.data() + at, &v, sizeof v);
}
template <class T>
T get(const unsigned char* p, size_t at) {
  T v;
  std::memcpy(&v, p + at, sizeof v);
  return v;
}
size_t pad8(size_t n) { return (n + 7) / 8 * 8; }

}  // namespace

uint64_t fnv1a64(const void* data, size_t n, uint64_t h) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= 0x100000001b3ULL;
  }
  return h;
}

void write_shard(const std::string& path, const std::vector<uint32_t>& tokens,
                 const std::vector<uint64_t>& doc_offsets, uint32_t vocab_size) {
  if (doc_offsets.empty() || doc_offsets.front() != 0 || doc_offsets.back() != tokens.size())
    throw Error(path + ": internal error: document offsets must start at 0 and end at the token count");
  const uint32_t token_bytes = vocab_size <= 65536 ? 2 : 4;
  const size_t tok_bytes = tokens.size() * token_bytes;
  std::string buf(kHeaderBytes + pad8(tok_bytes) + doc_offsets.size() * 8, '\0');
  unsigned char* tok = reinterpret_cast<unsigned char*>(buf.data()) + kHeaderBytes;
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] >= vocab_size) throw Error(path + ": internal error: token id >= vocab_size");
    if (token_bytes == 2) {
      uint16_t t = uint16_t(tokens[i]);
      std::memcpy(tok + 2 * i, &t, 2);
    } else {
      std::memcpy(tok + 4 * i, &tokens[i], 4);
    }
  }
  const size_t off_at = kHeaderBytes + pad8(tok_bytes);
  std::memcpy(buf.data() + off_at, doc_offsets.data(), doc_offsets.size() * 8);
  uint64_t checksum = fnv1a64(tok, tok_bytes);
  checksum = fnv1a64(buf.data() + off_at, doc_offsets.size() * 8, checksum);

  std::memcpy(buf.data(), kMagic, 8);
  put<uint32_t>(buf, 8, kVersion);
  put<uint32_t>(buf, 12, token_bytes);
  put<uint32_t>(buf, 16, vocab_size);
  put<uint32_t>(buf, 20, 0);
  put<uint64_t>(buf, 24, tokens.size());
  put<uint64_t>(buf, 32, doc_offsets.size() - 1);
  put<uint64_t>(buf, 40, checksum);
  put<uint64_t>(buf, 48, fnv1a64(buf.data(), 48));  // header checksum over [0,48)
  write_file_atomic(path, buf);
}

std::shared_ptr<const Shard> Shard::open(const std::string& path, bool verify) {
  std::shared_ptr<Shard> s(new Shard());
  s->path_ = path;
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw file_error(path, std::string("cannot open shard: ") + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    throw file_error(path, std::string("cannot stat shard: ") + std::strerror(errno));
  }
  const size_t file_bytes = size_t(st.st_size);
  if (file_bytes < kHeaderBytes) {
    ::close(fd);
    throw file_error(path, "truncated shard: " + std::to_string(file_bytes) +
                               " bytes, smaller than the 64-byte header");
  }
  void* m = ::mmap(nullptr, file_bytes, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (m == MAP_FAILED) throw file_error(path, std::string("cannot map shard: ") + std::strerror(errno));
  s->base_ = static_cast<const unsigned char*>(m);
  s->mapped_bytes_ = file_bytes;
  const unsigned char* p = s->base_;

  if (std::memcmp(p, kMagic, 8) != 0) throw file_error(path, "not a moecpt shard (bad magic bytes)");
  if (get<uint64_t>(p, 48) != fnv1a64(p, 48)) throw file_error(path, "corrupt shard header (header checksum mismatch)");
  ShardInfo& info = s->info_;
  info.version = get<uint32_t>(p, 8);
  info.token_bytes = get<uint32_t>(p, 12);
  info.vocab_size = get<uint32_t>(p, 16);
  info.n_tokens = get<uint64_t>(p, 24);
  info.n_docs = get<uint64_t>(p, 32);
  info.checksum = get<uint64_t>(p, 40);
  if (info.version != kVersion)
    throw file_error(path, "unsupported shard version " + std::to_string(info.version) + " (this build reads " +
                               std::to_string(kVersion) + ")");
  if (info.token_bytes != 2 && info.token_bytes != 4)
    throw file_error(path, "corrupt shard header: token width " + std::to_string(info.token_bytes) + " bytes");
  // Sizes are validated against the file before any use (overflow-safe).
  const uint64_t max_units = file_bytes;
  if (info.n_tokens > max_units || info.n_docs > max_units)
    throw file_error(path, "truncated shard: header promises " + std::to_string(info.n_tokens) + " tokens and " +
                               std::to_string(info.n_docs) + " documents but the file is " +
                               std::to_string(file_bytes) + " bytes");
  const uint64_t tok_bytes = info.n_tokens * info.token_bytes;
  const uint64_t expected = kHeaderBytes + pad8(tok_bytes) + (info.n_docs + 1) * 8;
  if (expected != file_bytes)
    throw file_error(path, std::string(expected > file_bytes ? "truncated" : "corrupt") + " shard: header promises " +
                               std::to_string(info.n_tokens) + " tokens and " + std::to_string(info.n_docs) +
                               " documents (" + std::to_string(expected) + " bytes) but the file is " +
                               std::to_string(file_bytes) + " bytes");
  s->tokens_ = p + kHeaderBytes;
  s->offsets_ = reinterpret_cast<const uint64_t*>(p + kHeaderBytes + pad8(tok_bytes));
  if (s->offsets_[0] != 0 || s->offsets_[info.n_docs] != info.n_tokens)
    throw file_error(path, "corrupt shard: document offsets do not span the token stream");
  // Offsets are checked even without `verify`: document() hands them to
  // callers that index the token stream with them (cheap: 8 bytes per document).
  for (uint64_t d = 0; d < info.n_docs; ++d)
    if (s->offsets_[d] > s->offsets_[d + 1])
      throw file_error(path, "corrupt shard: document offsets not increasing at document " + std::to_string(d));
  if (verify) {
    uint64_t c = fnv1a64(s->tokens_, tok_bytes);
    c = fnv1a64(s->offsets_, (info.n_docs + 1) * 8, c);
    if (c != info.checksum) throw file_error(path, "corrupt shard: checksum mismatch (file damaged or modified)");
    for (uint64_t i = 0; i < info.n_tokens; ++i)
      if (s->token(i) >= info.vocab_size)
        throw file_error(path, "corrupt shard: token " + std::to_string(i) + " has id " +
                                   std::to_string(s->token(i)) + " >= vocab_size " +
                                   std::to_string(info.vocab_size));
  }
  return s;
}

Shard::~Shard() {
  if (base_) ::munmap(const_cast<unsigned char*>(base_), mapped_bytes_);
}

uint32_t Shard::token(uint64_t i) const {
  if (info_.token_bytes == 2) {
    uint16_t t;
    std::memcpy(&t, tokens_ + 2 * i, 2);
    return t;
  }
  uint32_t t;
  std::memcpy(&t, tokens_ + 4 * i, 4);
  return t;
}

void Shard::copy(uint64_t begin, uint64_t n, int64_t* out) const {
  if (begin > info_.n_tokens || n > info_.n_tokens - begin)  // overflow-safe begin + n > n_tokens
    throw file_error(path_, "read of tokens [" + std::to_string(begin) + ", +" + std::to_string(n) +
                                ") past the end of the shard (" + std::to_string(info_.n_tokens) + " tokens)");
  for (uint64_t i = 0; i < n; ++i) out[i] = token(begin + i);
}

std::pair<uint64_t, uint64_t> Shard::document(uint64_t d) const {
  if (d >= info_.n_docs) throw file_error(path_, "document index out of range");
  return {offsets_[d], offsets_[d + 1]};
}

}  // namespace moecpt

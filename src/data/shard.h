// Binary token shards: one file per (dataset, split).
//
// Layout (little-endian):
//   [0,64)   header: magic "MOECPTSH", u32 version (=1), u32 token_bytes (2|4),
//            u32 vocab_size, u32 reserved (0), u64 n_tokens, u64 n_docs,
//            u64 checksum (FNV-1a 64 over token bytes then doc offsets),
//            u64 header_checksum (FNV-1a 64 over bytes [0,48)), 8 zero bytes.
//   tokens   n_tokens × token_bytes, each document followed by the EOS id
//   padding  zero bytes up to a multiple of 8
//   offsets  (n_docs + 1) × u64: start of each document in tokens; last = n_tokens
// Readers memory-map the file and validate everything before use.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace moecpt {

struct ShardInfo {
  uint32_t version = 0;
  uint32_t token_bytes = 0;
  uint32_t vocab_size = 0;
  uint64_t n_tokens = 0;
  uint64_t n_docs = 0;
  uint64_t checksum = 0;
};

// Write a shard atomically (temp file + rename). `doc_offsets` has n_docs + 1
// entries, starts at 0 and ends at tokens.size().
void write_shard(const std::string& path, const std::vector<uint32_t>& tokens,
                 const std::vector<uint64_t>& doc_offsets, uint32_t vocab_size);

class Shard {
 public:
  // Map and validate `path`. With verify=true the checksum and every token id
  // (< vocab_size) are checked too (one pass over the file).
  static std::shared_ptr<const Shard> open(const std::string& path, bool verify = true);
  ~Shard();
  Shard(const Shard&) = delete;
  Shard& operator=(const Shard&) = delete;

  const ShardInfo& info() const { return info_; }
  const std::string& path() const { return path_; }
  uint64_t size() const { return info_.n_tokens; }
  uint32_t token(uint64_t i) const;
  // Copy tokens [begin, begin+n) into `out` as int64 (the model's id type).
  void copy(uint64_t begin, uint64_t n, int64_t* out) const;
  // Token range [first, second) of document `d`.
  std::pair<uint64_t, uint64_t> document(uint64_t d) const;

 private:
  Shard() = default;
  std::string path_;
  ShardInfo info_;
  const unsigned char* base_ = nullptr;
  size_t mapped_bytes_ = 0;
  const unsigned char* tokens_ = nullptr;
  const uint64_t* offsets_ = nullptr;
};

uint64_t fnv1a64(const void* data, size_t n, uint64_t h = 0xcbf29ce484222325ULL);

}  // namespace moecpt

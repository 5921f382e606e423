#include "data/documents.h"

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "data/mixture.h"
#include "data/shard.h"

namespace moecpt {

std::vector<Document> read_documents(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw file_error(path, "cannot open corpus file");
  std::vector<Document> docs;
  std::string line;
  size_t lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      throw file_error(path, "line " + std::to_string(lineno) + ": invalid JSON (" + e.what() + ")");
    }
    if (!j.is_object() || !j.contains("text") || !j["text"].is_string())
      throw file_error(path, "line " + std::to_string(lineno) + ": expected an object with a string \"text\"");
    Document d;
    d.text = j["text"].get<std::string>();
    d.id = j.contains("id") && j["id"].is_string() ? j["id"].get<std::string>() : std::to_string(lineno);
    docs.push_back(std::move(d));
  }
  if (docs.empty()) throw file_error(path, "corpus holds no documents");
  return docs;
}

bool is_validation_document(const std::string& id, double val_fraction, uint64_t seed) {
  // FNV's high bits mix poorly for ids that differ in their last characters
  // (chapter_1, chapter_2, ...): finish with splitmix64.
  const uint64_t h = splitmix64(fnv1a64(id.data(), id.size(), fnv1a64(&seed, sizeof seed)));
  // Top 53 bits as a uniform number in [0,1).
  return double(h >> 11) * (1.0 / 9007199254740992.0) < val_fraction;
}

void split_documents(const std::vector<Document>& docs, double val_fraction, uint64_t seed,
                     std::vector<const Document*>& train, std::vector<const Document*>& val) {
  train.clear();
  val.clear();
  for (const auto& d : docs) (is_validation_document(d.id, val_fraction, seed) ? val : train).push_back(&d);
  // Tiny corpora: make sure both splits are non-empty (move the first/last document).
  if (docs.size() >= 2 && val_fraction > 0 && val.empty()) {
    val.push_back(train.back());
    train.pop_back();
  }
  if (docs.size() >= 2 && train.empty()) {
    train.push_back(val.back());
    val.pop_back();
  }
}

}  // namespace moecpt

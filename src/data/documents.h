// Corpora on disk are JSONL: one document per line, {"id": str, "text": str, ...}.
// Document boundaries matter: validation splits are by document, never by token.
#pragma once
#include <string>
#include <vector>

namespace moecpt {

struct Document {
  std::string id;
  std::string text;
};

// Read every document of a JSONL corpus. Errors name the file and line.
std::vector<Document> read_documents(const std::string& path);

// Deterministic split by document id: a document is held out when a hash of
// (seed, id) falls below `val_fraction`. At least one document is held out
// and at least one kept when the corpus has two or more.
bool is_validation_document(const std::string& id, double val_fraction, uint64_t seed);
void split_documents(const std::vector<Document>& docs, double val_fraction, uint64_t seed,
                     std::vector<const Document*>& train, std::vector<const Document*>& val);

}  // namespace moecpt

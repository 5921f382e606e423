// Fuzz the safetensors reader (src/core/safetensors_format.h), i.e. everything
// load_safetensors() does before and while it allocates tensors: the 8-byte
// header length against the file size, the JSON header (dtype, shape,
// data_offsets, overlap/gap/tail checks), then reading every tensor's bytes.
// The only acceptable failure is a moecpt::Error that names the file.
#include <cstring>
#include <vector>

#include "core/error.h"
#include "core/safetensors_format.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& path = moecpt::fuzz::scratch_path(".safetensors");
  moecpt::fuzz::write_scratch(path, data, size);
  try {
    moecpt::SafetensorsReader reader(path);
    const auto& layout = reader.layout();
    uint64_t covered = 0;
    for (const auto& t : layout.tensors) {
      // Validated sizes never exceed the file: this allocation is bounded.
      if (t.nbytes > size) __builtin_trap();
      std::vector<unsigned char> buf(t.nbytes);
      reader.read(t, buf.data());
      if (t.nbytes && std::memcmp(buf.data(), data + layout.data_start + t.begin, t.nbytes) != 0) __builtin_trap();
      covered += t.nbytes;
    }
    if (layout.data_start + covered != size) __builtin_trap();  // tensors tile the data buffer
  } catch (const moecpt::Error& e) {
    if (std::string(e.what()).rfind(path + ": ", 0) != 0) __builtin_trap();  // errors name the file
  }
  return 0;
}

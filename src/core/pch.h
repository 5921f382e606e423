// Precompiled header: LibTorch's headers cost ~25 s per translation unit on a
// 2-core machine; compiling them once here keeps the build in minutes.
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

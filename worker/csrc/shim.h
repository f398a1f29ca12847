// What every C++ shim of the worker shares: errors go back to Rust as a
// NUL-terminated message in the caller's buffer `err` of `errlen` bytes
// (truncated to fit).
#pragma once

#include <algorithm>
#include <cstring>
#include <string>

namespace distill_shim {
inline void set_err(char* err, int errlen, const std::string& msg) {
  if (err == nullptr || errlen <= 0) return;
  auto n = std::min<size_t>(msg.size(), static_cast<size_t>(errlen - 1));
  std::memcpy(err, msg.data(), n);
  err[n] = '\0';
}
}  // namespace distill_shim

// Byte streams between the socket and the archive code. api/ implements them over HTTP bodies
// (Content-Length or chunked); tests implement them over memory and files.
#pragma once

#include <cstddef>
#include <span>
#include <string>

#include "layerd/core/task.hpp"

namespace layerd::archive {

// One entry of Changes. Kind values as Docker's archive.ChangeType.
struct Change {
  enum Kind : int { kModified = 0, kAdded = 1, kDeleted = 2 };
  std::string path;  // absolute within the layer: "/etc/hosts"
  int kind = kModified;
  bool operator==(const Change&) const = default;
};

class ByteSource {
 public:
  virtual ~ByteSource() = default;
  // Reads up to buf.size() bytes; 0 means end of stream. Throws layerd::Error on failure
  // (a client that went away, a malformed chunk).
  virtual core::Task<std::size_t> read(std::span<std::byte> buf) = 0;
};

class ByteSink {
 public:
  virtual ~ByteSink() = default;
  // Writes all of `data`. Throws layerd::Error on failure.
  virtual core::Task<void> write(std::span<const std::byte> data) = 0;
};

}  // namespace layerd::archive

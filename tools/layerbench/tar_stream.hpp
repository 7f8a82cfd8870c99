// Generated tar layers for the apply scenario, produced lazily so a multi-GiB layer never sits in
// memory: POSIX ustar headers, deterministic file contents.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace layerbench {

struct TarEntry {
  std::string name;     // relative path; directories end with '/'
  std::uint64_t size = 0;
  bool directory = false;
};

// Builds a 512-byte ustar header. Names longer than 100 bytes use the prefix field.
std::string ustar_header(const TarEntry& entry);

class TarStream {
 public:
  explicit TarStream(std::vector<TarEntry> entries);

  // A layer of `files` files of `file_size` bytes under "files/".
  static TarStream small_files(std::size_t files, std::uint64_t file_size);
  // A layer of one file of `size` bytes.
  static TarStream big_file(std::uint64_t size);

  // Fills `buffer` with up to `capacity` next bytes; 0 at the end of the archive.
  std::size_t read(char* buffer, std::size_t capacity);
  // Total bytes the archive has (headers, data, padding and the end blocks).
  [[nodiscard]] std::uint64_t total_size() const noexcept { return total_; }

 private:
  std::vector<TarEntry> entries_;
  std::size_t index_ = 0;
  std::string header_;            // the current entry's header, being emitted
  std::size_t header_pos_ = 0;
  std::uint64_t data_left_ = 0;   // data bytes of the current entry still to emit
  std::uint64_t data_pos_ = 0;
  std::uint64_t pad_left_ = 0;
  std::uint64_t trailer_left_ = 1024;
  bool in_entry_ = false;
  std::uint64_t total_ = 0;
};

}  // namespace layerbench

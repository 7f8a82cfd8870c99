#include "tar_stream.hpp"

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

namespace layerbench {

namespace {

void put_octal(char* field, std::size_t width, std::uint64_t value) {
  // width-1 octal digits, then NUL, as ustar wants.
  std::string text = fmt::format("{:0{}o}", value, width - 1);
  std::memcpy(field, text.data(), std::min(text.size(), width - 1));
  field[width - 1] = '\0';
}

}  // namespace

std::string ustar_header(const TarEntry& entry) {
  std::string h(512, '\0');
  std::string name = entry.name;
  std::string prefix;
  if (name.size() > 100) {
    // Split at a '/' so the prefix holds the directories.
    std::size_t cut = name.rfind('/', name.size() - 2);
    if (cut != std::string::npos && cut <= 155 && name.size() - cut - 1 <= 100) {
      prefix = name.substr(0, cut);
      name = name.substr(cut + 1);
    }
  }
  std::memcpy(&h[0], name.data(), std::min<std::size_t>(name.size(), 100));
  put_octal(&h[100], 8, entry.directory ? 0755 : 0644);
  put_octal(&h[108], 8, 0);
  put_octal(&h[116], 8, 0);
  put_octal(&h[124], 12, entry.directory ? 0 : entry.size);
  put_octal(&h[136], 12, 1700000000);
  h[156] = entry.directory ? '5' : '0';
  std::memcpy(&h[257], "ustar", 6);
  std::memcpy(&h[263], "00", 2);
  std::memcpy(&h[265], "root", 4);
  std::memcpy(&h[297], "root", 4);
  std::memcpy(&h[345], prefix.data(), std::min<std::size_t>(prefix.size(), 155));
  // The checksum is computed with its own field as spaces.
  std::memset(&h[148], ' ', 8);
  unsigned sum = 0;
  for (unsigned char c : h) sum += c;
  std::string chk = fmt::format("{:06o}", sum);
  std::memcpy(&h[148], chk.data(), 6);
  h[154] = '\0';
  h[155] = ' ';
  return h;
}

TarStream::TarStream(std::vector<TarEntry> entries) : entries_(std::move(entries)) {
  total_ = 1024;
  for (const auto& e : entries_) {
    std::uint64_t size = e.directory ? 0 : e.size;
    total_ += 512 + size + (512 - size % 512) % 512;
  }
}

TarStream TarStream::small_files(std::size_t files, std::uint64_t file_size) {
  std::vector<TarEntry> entries;
  entries.push_back({"files/", 0, true});
  for (std::size_t i = 0; i < files; ++i) {
    entries.push_back({fmt::format("files/f{:06}", i), file_size, false});
  }
  return TarStream(std::move(entries));
}

TarStream TarStream::big_file(std::uint64_t size) {
  return TarStream({{"big.bin", size, false}});
}

std::size_t TarStream::read(char* buffer, std::size_t capacity) {
  std::size_t filled = 0;
  while (filled < capacity) {
    if (!in_entry_) {
      if (index_ < entries_.size()) {
        const TarEntry& e = entries_[index_++];
        header_ = ustar_header(e);
        header_pos_ = 0;
        data_left_ = e.directory ? 0 : e.size;
        data_pos_ = 0;
        pad_left_ = (512 - data_left_ % 512) % 512;
        in_entry_ = true;
      } else if (trailer_left_ > 0) {
        std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(trailer_left_, capacity - filled));
        std::memset(buffer + filled, 0, n);
        filled += n;
        trailer_left_ -= n;
        continue;
      } else {
        break;
      }
    }
    if (header_pos_ < header_.size()) {
      std::size_t n = std::min(header_.size() - header_pos_, capacity - filled);
      std::memcpy(buffer + filled, header_.data() + header_pos_, n);
      header_pos_ += n;
      filled += n;
      continue;
    }
    if (data_left_ > 0) {
      std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(data_left_, capacity - filled));
      // Deterministic, not all zeros (so nothing can take a sparse shortcut).
      for (std::size_t i = 0; i < n; ++i) {
        buffer[filled + i] = static_cast<char>('a' + (data_pos_ + i) % 23);
      }
      data_pos_ += n;
      data_left_ -= n;
      filled += n;
      continue;
    }
    if (pad_left_ > 0) {
      std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(pad_left_, capacity - filled));
      std::memset(buffer + filled, 0, n);
      pad_left_ -= n;
      filled += n;
      continue;
    }
    in_entry_ = false;
  }
  return filled;
}

}  // namespace layerbench

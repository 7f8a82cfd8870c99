// Test helpers for archive/: in-memory byte streams, a tar builder on libarchive's writer, temp
// directories, and tree snapshots for comparisons.
#pragma once

#include <archive.h>
#include <archive_entry.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "layerd/archive/archive.hpp"
#include "layerd/core/ops.hpp"

namespace archive_test {

using layerd::archive::ByteSink;
using layerd::archive::ByteSource;
using layerd::core::Task;

class MemorySource final : public ByteSource {
 public:
  explicit MemorySource(std::vector<std::byte> data, std::size_t chunk = 1 << 16, bool yield = false)
      : data_(std::move(data)), chunk_(chunk), yield_(yield) {}
  Task<std::size_t> read(std::span<std::byte> buf) override {
    // yield: behave like a socket, giving the loop a turn on every read.
    if (yield_) co_await layerd::core::yield();
    std::size_t n = std::min({buf.size(), chunk_, data_.size() - pos_});
    if (n > 0) std::memcpy(buf.data(), data_.data() + pos_, n);
    pos_ += n;
    co_return n;
  }

 private:
  std::vector<std::byte> data_;
  std::size_t pos_ = 0;
  std::size_t chunk_;
  bool yield_;
};

class MemorySink final : public ByteSink {
 public:
  Task<void> write(std::span<const std::byte> data) override {
    bytes.insert(bytes.end(), data.begin(), data.end());
    co_return;
  }
  std::vector<std::byte> bytes;
};

struct TarEntry {
  std::string name;
  mode_t type = AE_IFREG;
  mode_t perm = 0644;
  std::string data;
  std::string link;      // symlink target
  std::string hardlink;  // hardlink target
  std::int64_t uid = 0, gid = 0;
  time_t mtime = 1'600'000'000;
  dev_t rdev = 0;
  std::vector<std::pair<std::string, std::string>> xattrs;
  std::int64_t declared_size = -1;  // >= 0: header size differs from data
};

// filter: "", "gzip", "xz", "zstd"
inline std::vector<std::byte> make_tar(const std::vector<TarEntry>& entries, const std::string& filter = "") {
  struct archive* a = archive_write_new();
  archive_write_set_format_pax_restricted(a);
  if (filter == "gzip") archive_write_add_filter_gzip(a);
  else if (filter == "xz") archive_write_add_filter_xz(a);
  else if (filter == "zstd") archive_write_add_filter_zstd(a);
  archive_write_set_bytes_per_block(a, 0);
  std::vector<char> buf(1 << 20);
  std::vector<std::byte> out;
  struct State { std::vector<std::byte>* out; } state{&out};
  archive_write_open(
      a, &state, nullptr,
      [](struct archive*, void* s, const void* b, size_t n) -> la_ssize_t {
        auto* st = static_cast<State*>(s);
        auto* p = static_cast<const std::byte*>(b);
        st->out->insert(st->out->end(), p, p + n);
        return static_cast<la_ssize_t>(n);
      },
      nullptr);
  for (const auto& e : entries) {
    struct archive_entry* ae = archive_entry_new();
    archive_entry_set_pathname(ae, e.name.c_str());
    archive_entry_set_filetype(ae, e.type);
    archive_entry_set_perm(ae, e.perm);
    archive_entry_set_uid(ae, e.uid);
    archive_entry_set_gid(ae, e.gid);
    archive_entry_set_mtime(ae, e.mtime, 0);
    if (!e.link.empty()) archive_entry_set_symlink(ae, e.link.c_str());
    if (!e.hardlink.empty()) archive_entry_set_hardlink(ae, e.hardlink.c_str());
    if (e.type == AE_IFCHR || e.type == AE_IFBLK) archive_entry_set_rdev(ae, e.rdev);
    if (e.type == AE_IFREG && e.hardlink.empty())
      archive_entry_set_size(ae, e.declared_size >= 0 ? e.declared_size : static_cast<std::int64_t>(e.data.size()));
    for (const auto& [k, v] : e.xattrs) archive_entry_xattr_add_entry(ae, k.c_str(), v.data(), v.size());
    if (archive_write_header(a, ae) != ARCHIVE_OK) throw std::runtime_error(archive_error_string(a));
    if (!e.data.empty()) archive_write_data(a, e.data.data(), e.data.size());
    archive_entry_free(ae);
  }
  archive_write_close(a);
  archive_write_free(a);
  return out;
}

// Names in a tar (with a type letter and size), in order.
inline std::vector<std::string> list_tar(const std::vector<std::byte>& tar) {
  struct archive* a = archive_read_new();
  archive_read_support_format_tar(a);
  archive_read_support_format_empty(a);
  archive_read_open_memory(a, tar.data(), tar.size());
  std::vector<std::string> out;
  struct archive_entry* ae;
  while (archive_read_next_header(a, &ae) == ARCHIVE_OK) {
    std::string kind = archive_entry_hardlink(ae) ? "h" :
        archive_entry_filetype(ae) == AE_IFDIR ? "d" : archive_entry_filetype(ae) == AE_IFLNK ? "l" :
        archive_entry_filetype(ae) == AE_IFREG ? "f" : "o";
    out.push_back(kind + " " + archive_entry_pathname(ae));
  }
  archive_read_free(a);
  return out;
}

class TempDir {
 public:
  explicit TempDir(const char* base = "/tmp") {
    std::string tmpl = std::string(base) + "/layerd-archive-XXXXXX";
    if (!::mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp");
    path = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string sub(const std::string& name) const {
    std::string p = path + "/" + name;
    ::mkdir(p.c_str(), 0755);
    return p;
  }
  std::string path;
};

inline int open_dir(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error("open " + path);
  return fd;
}

// A description of every entry below `root` (type, mode, owner, mtime, size, content, link,
// xattrs, hardlink group), keyed by relative path.
inline std::map<std::string, std::string> snapshot(const std::string& root) {
  std::map<std::string, std::string> out;
  std::map<ino_t, std::string> first_name;
  std::vector<std::string> paths;
  for (auto it = std::filesystem::recursive_directory_iterator(root); it != std::filesystem::recursive_directory_iterator(); ++it)
    paths.push_back(it->path().string());
  std::sort(paths.begin(), paths.end());
  for (const auto& p : paths) {
    struct stat st;
    ::lstat(p.c_str(), &st);
    std::string rel = p.substr(root.size());
    std::string d = std::to_string(st.st_mode) + " " + std::to_string(st.st_uid) + ":" + std::to_string(st.st_gid) +
                    " t" + std::to_string(st.st_mtim.tv_sec) + "." + std::to_string(st.st_mtim.tv_nsec);
    if (S_ISREG(st.st_mode)) {
      d += " s" + std::to_string(st.st_size);
      std::string content(static_cast<std::size_t>(st.st_size), '\0');
      int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
      std::size_t got = 0;
      while (got < content.size()) {
        ssize_t n = ::read(fd, content.data() + got, content.size() - got);
        if (n <= 0) break;
        got += static_cast<std::size_t>(n);
      }
      ::close(fd);
      d += " h" + std::to_string(std::hash<std::string>{}(content));
      if (st.st_nlink > 1) {
        auto [pos, fresh] = first_name.emplace(st.st_ino, rel);
        d += " link-group " + pos->second;
      }
    }
    if (S_ISLNK(st.st_mode)) {
      char buf[4096];
      ssize_t n = ::readlink(p.c_str(), buf, sizeof buf);
      d += " -> " + std::string(buf, static_cast<std::size_t>(n));
    } else {
      char names[4096];
      ssize_t n = ::llistxattr(p.c_str(), names, sizeof names);
      std::vector<std::string> keys;
      for (ssize_t i = 0; i < n;) {
        keys.emplace_back(names + i);
        i += static_cast<ssize_t>(keys.back().size()) + 1;
      }
      std::sort(keys.begin(), keys.end());
      for (const auto& k : keys) {
        char value[4096];
        ssize_t m = ::lgetxattr(p.c_str(), k.c_str(), value, sizeof value);
        d += " x:" + k + "=" + std::string(value, static_cast<std::size_t>(std::max<ssize_t>(m, 0)));
      }
    }
    if (S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode)) d += " dev" + std::to_string(st.st_rdev);
    out[rel] = d;
  }
  return out;
}

inline bool is_root() { return ::geteuid() == 0; }

}  // namespace archive_test

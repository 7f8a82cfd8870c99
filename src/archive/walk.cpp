#include "walk.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "layerd/sys/error.hpp"

namespace layerd::archive::detail {

namespace {

constexpr const char* kOpaqueXattrs[] = {"trusted.overlay.opaque", "user.overlay.opaque",
                                         "user.fuseoverlayfs.opaque"};

// xattr calls on a name relative to a directory fd: through /proc/self/fd, whose magic link
// resolves to that very directory; the l*xattr calls do not follow the final component.
std::string proc_path(int parent, const std::string& name) {
  return "/proc/self/fd/" + std::to_string(parent) + "/" + name;
}

bool internal_xattr(const std::string& key) {
  for (const char* prefix : {"trusted.overlay.", "user.overlay.", "user.fuseoverlayfs."}) {
    if (key.rfind(prefix, 0) == 0) return true;
  }
  return false;
}

}  // namespace

std::vector<Node> list_dir(int dirfd, const std::string& context) {
  int fd = ::openat(dirfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw Error(errno, "reading directory " + context);
  DIR* dir = ::fdopendir(fd);
  if (!dir) {
    int err = errno;
    ::close(fd);
    throw Error(err, "reading directory " + context);
  }
  std::vector<Node> nodes;
  errno = 0;
  while (dirent* d = ::readdir(dir)) {
    if (std::strcmp(d->d_name, ".") == 0 || std::strcmp(d->d_name, "..") == 0) continue;
    Node n;
    n.name = d->d_name;
    if (::fstatat(dirfd, d->d_name, &n.st, AT_SYMLINK_NOFOLLOW) != 0) {
      if (errno == ENOENT) continue;  // removed while we read
      int err = errno;
      ::closedir(dir);
      throw Error(err, "lstat of " + context + "/" + n.name);
    }
    nodes.push_back(std::move(n));
    errno = 0;
  }
  int err = errno;
  ::closedir(dir);
  if (err != 0) throw Error(err, "reading directory " + context);
  std::sort(nodes.begin(), nodes.end(), [](const Node& a, const Node& b) { return a.name < b.name; });
  return nodes;
}

sys::UniqueFd open_dir(int parent, const std::string& name, const std::string& context) {
  int fd = ::openat(parent, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) throw Error(errno, "opening directory " + context);
  return sys::UniqueFd(fd);
}

bool is_whiteout_device(const struct stat& st) { return S_ISCHR(st.st_mode) && st.st_rdev == 0; }

bool has_opaque_xattr(int parent, const std::string& name) {
  std::string path = proc_path(parent, name);
  for (const char* key : kOpaqueXattrs) {
    char value[4];
    ssize_t n = ::lgetxattr(path.c_str(), key, value, sizeof value);
    if (n == 1 && (value[0] == 'y' || value[0] == 'Y')) return true;
  }
  return false;
}

bool is_opaque_dir(int parent, const std::string& name) {
  struct stat st;
  std::string marker = name + "/" + kOpaqueMarker;
  if (::fstatat(parent, marker.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0) return true;
  return has_opaque_xattr(parent, name);
}

std::vector<std::pair<std::string, std::string>> layer_xattrs(int parent, const std::string& name) {
  std::vector<std::pair<std::string, std::string>> out;
  std::string path = proc_path(parent, name);
  std::string names(1024, '\0');
  ssize_t n;
  for (;;) {
    n = ::llistxattr(path.c_str(), names.data(), names.size());
    if (n >= 0) break;
    if (errno == ERANGE) {
      names.resize(names.size() * 4);
      continue;
    }
    return out;  // no xattr support here: nothing to carry
  }
  for (std::size_t i = 0; i < static_cast<std::size_t>(n);) {
    std::string key(names.c_str() + i);
    i += key.size() + 1;
    if (key.empty() || internal_xattr(key)) continue;
    std::string value = get_xattr(parent, name, key.c_str());
    out.emplace_back(std::move(key), std::move(value));
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::string get_xattr(int parent, const std::string& name, const char* key) {
  std::string path = proc_path(parent, name);
  std::string value(256, '\0');
  for (;;) {
    ssize_t n = ::lgetxattr(path.c_str(), key, value.data(), value.size());
    if (n >= 0) {
      value.resize(static_cast<std::size_t>(n));
      return value;
    }
    if (errno != ERANGE || value.size() > (1 << 20)) return {};
    value.resize(value.size() * 8);
  }
}

std::string read_link(int parent, const std::string& name) {
  std::string target(256, '\0');
  for (;;) {
    ssize_t n = ::readlinkat(parent, name.c_str(), target.data(), target.size());
    if (n < 0) throw Error(errno, "readlink of " + name);
    if (static_cast<std::size_t>(n) < target.size()) {
      target.resize(static_cast<std::size_t>(n));
      return target;
    }
    target.resize(target.size() * 4);
  }
}

}  // namespace layerd::archive::detail

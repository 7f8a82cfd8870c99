// Blocking tree reading for export and changes: these run on the offload pool, never on the loop.
// Nothing here follows a symlink: directories are opened with O_NOFOLLOW relative to their
// parent's fd, entries are examined with AT_SYMLINK_NOFOLLOW.
#pragma once

#include <sys/stat.h>

#include <string>
#include <utility>
#include <vector>

#include "layerd/sys/fd.hpp"

namespace layerd::archive::detail {

struct Node {
  std::string name;
  struct stat st{};
};

// The entries of the directory `dirfd` (not consumed), lstat'ed, sorted bytewise by name.
std::vector<Node> list_dir(int dirfd, const std::string& context);
// Opens the directory `name` under `parent` without following a symlink. Throws on failure.
sys::UniqueFd open_dir(int parent, const std::string& name, const std::string& context);

// The AUFS and overlay whiteout and opaque conventions.
inline constexpr const char* kWhiteoutPrefix = ".wh.";
inline constexpr const char* kWhiteoutMetaPrefix = ".wh..wh.";
inline constexpr const char* kOpaqueMarker = ".wh..wh..opq";
bool is_whiteout_device(const struct stat& st);
// A directory made opaque by an xattr (any of overlay's or fuse-overlayfs's names).
bool has_opaque_xattr(int parent, const std::string& name);
// ... or by an AUFS marker file inside it.
bool is_opaque_dir(int parent, const std::string& name);
// xattrs a layer tar carries (overlay and fuse-overlayfs bookkeeping left out), sorted by name.
std::vector<std::pair<std::string, std::string>> layer_xattrs(int parent, const std::string& name);
// One xattr ("" when absent).
std::string get_xattr(int parent, const std::string& name, const char* key);
std::string read_link(int parent, const std::string& name);

inline std::string join_rel(const std::string& dir, const std::string& name) {
  return dir.empty() ? name : dir + "/" + name;
}

}  // namespace layerd::archive::detail

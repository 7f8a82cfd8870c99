// Changes and DiffSize. Both the native path (upper directory + lower existence checks) and the
// naive one (two full trees) produce moby's ChangesDirs result, in one deterministic order:
// depth first, names sorted bytewise within each directory (moby itself emits a directory's
// children in Go map order, so any order is "docker's"; this one is stable).
//
// moby's rules, reproduced here:
// - an entry only in the new tree is Added (and everything below it too);
// - an entry in both is Modified when mode, uid, gid or rdev differ, or (non-directories only)
//   the mtime (a zero nanosecond part on either side matches any) or the size differ, or the
//   security.capability xattr differs (naive path only);
// - an entry only in the old tree is Deleted, alone (nothing below it is listed);
// - a directory with changes below it that is not itself Added or Modified is inserted as
//   Modified right before them (the "C /etc above A /etc/newfile" rule); never the root.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <map>
#include <optional>
#include <set>
#include <unordered_set>

#include "layerd/archive/archive.hpp"
#include "layerd/core/ops.hpp"
#include "layerd/sys/error.hpp"
#include "walk.hpp"

namespace layerd::archive {

namespace {

using detail::Node;

bool same_time(const timespec& a, const timespec& b) {
  return a.tv_sec == b.tv_sec && (a.tv_nsec == b.tv_nsec || a.tv_nsec == 0 || b.tv_nsec == 0);
}

bool stat_different(const struct stat& o, const struct stat& n) {
  if (o.st_mode != n.st_mode || o.st_uid != n.st_uid || o.st_gid != n.st_gid || o.st_rdev != n.st_rdev)
    return true;
  return !S_ISDIR(o.st_mode) && (!same_time(o.st_mtim, n.st_mtim) || o.st_size != n.st_size);
}

std::string child_path(const std::string& path, const std::string& name) {
  return path == "/" ? "/" + name : path + "/" + name;
}

// Inserts "C path" before the changes recorded below a directory, as moby does.
void mark_parent(std::vector<Change>& out, std::size_t at, bool added, const std::string& path) {
  if (out.size() > at && !added && path != "/")
    out.insert(out.begin() + static_cast<std::ptrdiff_t>(at), Change{path, Change::kModified});
}

// --- naive: two full trees -----------------------------------------------------------------

void compare_dir(int new_fd, int old_fd, const std::string& path, bool added, std::vector<Change>& out) {
  std::size_t at = out.size();
  std::vector<Node> fresh = detail::list_dir(new_fd, path);
  std::vector<Node> old = old_fd >= 0 ? detail::list_dir(old_fd, path) : std::vector<Node>{};
  std::size_t i = 0, j = 0;
  while (i < fresh.size() || j < old.size()) {
    int order = i == fresh.size() ? 1 : j == old.size() ? -1 : fresh[i].name.compare(old[j].name);
    if (order > 0) {
      out.push_back({child_path(path, old[j].name), Change::kDeleted});
      ++j;
      continue;
    }
    const Node& n = fresh[i];
    std::string cpath = child_path(path, n.name);
    if (order < 0) {
      out.push_back({cpath, Change::kAdded});
      if (S_ISDIR(n.st.st_mode)) {
        auto sub = detail::open_dir(new_fd, n.name, cpath);
        compare_dir(sub.get(), -1, cpath, true, out);
      }
      ++i;
      continue;
    }
    const Node& o = old[j];
    bool child_added = false;
    if (stat_different(o.st, n.st) ||
        detail::get_xattr(new_fd, n.name, "security.capability") !=
            detail::get_xattr(old_fd, o.name, "security.capability")) {
      out.push_back({cpath, Change::kModified});
      child_added = true;
    }
    if (S_ISDIR(n.st.st_mode)) {
      auto sub = detail::open_dir(new_fd, n.name, cpath);
      sys::UniqueFd old_sub;
      if (S_ISDIR(o.st.st_mode)) old_sub = detail::open_dir(old_fd, o.name, cpath);
      compare_dir(sub.get(), old_sub.get(), cpath, child_added, out);
    }
    ++i;
    ++j;
  }
  mark_parent(out, at, added, path);
}

// --- native: the upper directory over the lowers' merged view -----------------------------

// The merged view of a layer's lowers (nearest first), as fuse-overlayfs presents it: AUFS
// whiteout files and 0/0 character devices hide names below them; an opaque directory (marker
// file or xattr) hides what farther lowers hold at that path; a non-directory hides farther
// lowers' directories.
class LowerView {
 public:
  explicit LowerView(const std::vector<int>& lowers) : lowers_(lowers) {}

  // The stat of `rel` in the view, or nothing. `active` receives, for a directory, the lowers
  // that contribute to its listing.
  std::optional<struct stat> lookup(const std::string& rel, std::vector<int>* active_out = nullptr) {
    std::vector<int> active(lowers_.begin(), lowers_.end());
    std::string dir;
    std::optional<struct stat> found;
    std::size_t i = 0;
    while (i <= rel.size()) {
      std::size_t slash = rel.find('/', i);
      if (slash == std::string::npos) slash = rel.size();
      std::string name = rel.substr(i, slash - i);
      bool last = slash == rel.size();
      i = slash + 1;
      std::string path = detail::join_rel(dir, name);
      std::vector<int> next;
      found.reset();
      for (int lower : active) {
        struct stat st;
        std::string whiteout = detail::join_rel(dir, detail::kWhiteoutPrefix + name);
        if (::fstatat(lower, whiteout.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0) break;
        if (::fstatat(lower, path.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
          if (errno == ENOENT || errno == ENOTDIR) continue;
          throw Error(errno, "lstat of " + path + " in a lower layer");
        }
        if (detail::is_whiteout_device(st)) break;
        if (!found) found = st;
        if (!S_ISDIR(st.st_mode)) break;
        next.push_back(lower);
        if (detail::is_opaque_dir(lower, path)) break;
      }
      if (!found) return std::nullopt;
      if (last) {
        if (active_out) *active_out = std::move(next);
        return found;
      }
      if (!S_ISDIR(found->st_mode)) return std::nullopt;
      active = std::move(next);
      dir = path;
    }
    return found;
  }

  // The merged listing of the directory `rel` ("" = root), sorted by name.
  std::map<std::string, struct stat> list(const std::string& rel) {
    std::vector<int> active;
    if (rel.empty()) {
      active.assign(lowers_.begin(), lowers_.end());
      for (std::size_t k = 0; k < active.size(); ++k) {
        if (detail::is_opaque_dir(active[k], ".")) {
          active.resize(k + 1);
          break;
        }
      }
    } else {
      auto st = lookup(rel, &active);
      if (!st || !S_ISDIR(st->st_mode)) return {};
    }
    std::map<std::string, struct stat> out;
    std::set<std::string> hidden;
    for (int lower : active) {
      sys::UniqueFd fd;
      int dirfd = lower;
      if (!rel.empty()) {
        fd = detail::open_dir(lower, rel, rel);
        dirfd = fd.get();
      }
      std::vector<std::string> whiteouts;
      for (Node& n : detail::list_dir(dirfd, rel)) {
        if (n.name.rfind(detail::kWhiteoutMetaPrefix, 0) == 0) continue;
        if (n.name.rfind(detail::kWhiteoutPrefix, 0) == 0) {
          whiteouts.push_back(n.name.substr(4));
          continue;
        }
        if (detail::is_whiteout_device(n.st)) {
          whiteouts.push_back(n.name);
          continue;
        }
        if (hidden.count(n.name) || out.count(n.name)) continue;
        out.emplace(n.name, n.st);
      }
      hidden.insert(whiteouts.begin(), whiteouts.end());
    }
    return out;
  }

 private:
  const std::vector<int>& lowers_;
};

enum class Mode {
  kMerged,    // the lowers show through: only whiteouts delete
  kReplaced,  // opaque: the new view is the upper alone, the old one the lowers' view
  kAllNew,    // nothing existed here before
};

void upper_dir(int ufd, const std::string& path, const std::string& rel, Mode mode, bool added,
               LowerView& lowers, std::vector<Change>& out) {
  std::size_t at = out.size();
  std::vector<Node> present;
  std::set<std::string> names;
  std::set<std::string> whiteouts;
  for (Node& n : detail::list_dir(ufd, path)) {
    if (n.name.rfind(detail::kWhiteoutMetaPrefix, 0) == 0) continue;
    if (n.name.rfind(detail::kWhiteoutPrefix, 0) == 0) {
      whiteouts.insert(n.name.substr(4));
    } else if (detail::is_whiteout_device(n.st)) {
      whiteouts.insert(n.name);
    } else {
      names.insert(n.name);
      present.push_back(std::move(n));
    }
  }
  // What the old view had that the new one does not.
  std::set<std::string> deleted;
  std::map<std::string, struct stat> old_children;
  if (mode == Mode::kReplaced) {
    old_children = lowers.list(rel);
    for (const auto& [name, st] : old_children)
      if (!names.count(name)) deleted.insert(name);
  } else if (mode == Mode::kMerged) {
    for (const std::string& name : whiteouts)
      if (!names.count(name) && lowers.lookup(detail::join_rel(rel, name))) deleted.insert(name);
  }
  auto d = deleted.begin();
  for (const Node& n : present) {
    for (; d != deleted.end() && *d < n.name; ++d) out.push_back({child_path(path, *d), Change::kDeleted});
    std::string cpath = child_path(path, n.name);
    std::string crel = detail::join_rel(rel, n.name);
    std::optional<struct stat> old;
    if (mode == Mode::kReplaced) {
      if (auto it = old_children.find(n.name); it != old_children.end()) old = it->second;
    } else if (mode == Mode::kMerged) {
      old = lowers.lookup(crel);
    }
    if (!old) {
      out.push_back({cpath, Change::kAdded});
      if (S_ISDIR(n.st.st_mode)) {
        auto sub = detail::open_dir(ufd, n.name, cpath);
        upper_dir(sub.get(), cpath, crel, Mode::kAllNew, true, lowers, out);
      }
      continue;
    }
    bool child_added = stat_different(*old, n.st);
    if (child_added) out.push_back({cpath, Change::kModified});
    if (S_ISDIR(n.st.st_mode)) {
      Mode sub_mode = !S_ISDIR(old->st_mode)                                     ? Mode::kAllNew
                      : mode == Mode::kReplaced || detail::is_opaque_dir(ufd, n.name) ? Mode::kReplaced
                                                                                  : Mode::kMerged;
      auto sub = detail::open_dir(ufd, n.name, cpath);
      upper_dir(sub.get(), cpath, crel, sub_mode, child_added, lowers, out);
    }
  }
  for (; d != deleted.end(); ++d) out.push_back({child_path(path, *d), Change::kDeleted});
  mark_parent(out, at, added, path);
}

std::uint64_t tree_size(int dirfd, const std::string& path, std::unordered_set<std::uint64_t>& inodes) {
  std::uint64_t total = 0;
  for (const Node& n : detail::list_dir(dirfd, path)) {
    if (S_ISDIR(n.st.st_mode)) {
      auto sub = detail::open_dir(dirfd, n.name, path + "/" + n.name);
      total += tree_size(sub.get(), path + "/" + n.name, inodes);
      continue;
    }
    if (n.st.st_nlink > 1 && !inodes.insert(static_cast<std::uint64_t>(n.st.st_ino)).second) continue;
    total += static_cast<std::uint64_t>(n.st.st_size);
  }
  return total;
}

}  // namespace

core::Task<std::vector<Change>> upper_changes(int diff_dirfd, const std::vector<int>& lower_dirfds) {
  // A directory walk: on the offload pool.
  co_return co_await core::offload([diff_dirfd, &lower_dirfds] {
    LowerView lowers(lower_dirfds);
    std::vector<Change> out;
    bool root_opaque = detail::is_opaque_dir(diff_dirfd, ".");
    upper_dir(diff_dirfd, "/", "", root_opaque ? Mode::kReplaced : Mode::kMerged, true, lowers, out);
    return out;
  });
}

core::Task<std::uint64_t> upper_diff_size(int diff_dirfd) {
  co_return co_await core::offload([diff_dirfd] {
    std::unordered_set<std::uint64_t> inodes;
    return tree_size(diff_dirfd, "", inodes);
  });
}

core::Task<std::vector<Change>> compare_trees(int new_root_fd, int old_root_fd) {
  co_return co_await core::offload([new_root_fd, old_root_fd] {
    std::vector<Change> out;
    compare_dir(new_root_fd, old_root_fd, "/", true, out);
    return out;
  });
}

}  // namespace layerd::archive

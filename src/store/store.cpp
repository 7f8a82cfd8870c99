#include "layerd/store/store.hpp"

#include <fcntl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <exception>
#include <set>

#include "layerd/core/ops.hpp"
#include "layerd/sys/error.hpp"
#include "layerd/sys/syscalls.hpp"
#include "tree.hpp"

namespace layerd::store {

namespace {

using core::Task;

constexpr std::size_t kSmallFileLimit = 64 * 1024;  // link and lower files (lower: ~3.7 KiB)
constexpr int kLinkIdAttempts = 16;

void fill_random(unsigned char* buf, std::size_t len) {
  std::size_t got = 0;
  while (got < len) {
    // The urandom pool never blocks once initialised (long before a daemon starts).
    ssize_t n = ::getrandom(buf + got, len - got, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw Error(errno, "getrandom");
    }
    got += static_cast<std::size_t>(n);
  }
}

// 12 lowercase hex characters: the random part of staging and trash names.
std::string random_suffix() {
  unsigned char bytes[6];
  fill_random(bytes, sizeof bytes);
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  for (unsigned char b : bytes) {
    out.push_back(kHex[b >> 4]);
    out.push_back(kHex[b & 15]);
  }
  return out;
}

// The id as it may appear in a message: control characters escaped, long ids cut.
std::string printable(std::string_view id) {
  std::string out;
  for (char c : id.substr(0, 256)) {
    auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", u);
      out += buf;
    } else {
      out.push_back(c);
    }
  }
  if (id.size() > 256) out += "...";
  return out;
}

const char* invalid_reason(std::string_view id) noexcept {
  if (id.empty()) return "empty";
  if (id.size() > kMaxIdLength) return "longer than 200 bytes";
  if (id == "." || id == "..") return "a relative path component";
  if (id == kLinkDirName) return "reserved by the layout (the link directory)";
  // Every name starting ".layerd-" is kept for layerd's own staging and trash entries.
  if (id.starts_with(".layerd-")) return "reserved by the layout (layerd's staging/trash names)";
  for (char c : id) {
    auto u = static_cast<unsigned char>(c);
    if (c == '/') return "contains '/'";
    if (c == '\0') return "contains NUL";
    if (u < 0x20 || u == 0x7f) return "contains a control character";
    // HOME/ID/diff goes into fuse-overlayfs' -o lowerdir=...:...,upperdir=...: a ':' or ','
    // in an id would split or inject mount options.
    if (c == ':' || c == ',') return "contains ':' or ',' (would break mount options)";
  }
  return nullptr;
}

std::vector<std::string> split_lowers(const std::string& text) {
  std::vector<std::string> out;
  if (text.empty()) return out;
  std::size_t pos = 0;
  for (;;) {
    std::size_t next = text.find(':', pos);
    if (next == std::string::npos) {
      out.push_back(text.substr(pos));
      break;
    }
    out.push_back(text.substr(pos, next - pos));
    pos = next + 1;
  }
  return out;
}

std::string join_lowers(const std::vector<std::string>& lowers) {
  std::string out;
  for (const auto& l : lowers) {
    if (!out.empty()) out.push_back(':');
    out += l;
  }
  return out;
}

// Reads a small file relative to `dirfd` with ring ops. 0 or -errno; `out` set on success.
Task<int> read_file(int dirfd, std::string path, std::string& out) {
  int fd = co_await core::openat(dirfd, path.c_str(), O_RDONLY | O_NOFOLLOW | O_NOCTTY);
  if (fd < 0) co_return fd;
  sys::UniqueFd owner(fd);
  std::string data;
  std::vector<char> buf(4096);
  for (;;) {
    int n = co_await core::read(fd, buf.data(), static_cast<unsigned>(buf.size()), data.size());
    if (n < 0) co_return n;
    if (n == 0) break;
    if (data.size() + static_cast<std::size_t>(n) > kSmallFileLimit) co_return -EFBIG;
    data.append(buf.data(), static_cast<std::size_t>(n));
  }
  out = std::move(data);
  co_return 0;
}

// Creates (or truncates) a file and writes `content`; with `durable`, fdatasyncs it. Used only
// inside a staging directory that is renamed into place afterwards, which is what makes the
// write atomic for readers. 0 or -errno.
Task<int> write_file(int dirfd, std::string path, std::string content, unsigned mode,
                     bool durable) {
  int fd = co_await core::openat(dirfd, path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW,
                                 mode);
  if (fd < 0) co_return fd;
  sys::UniqueFd owner(fd);
  std::size_t done = 0;
  while (done < content.size()) {
    int n = co_await core::write(fd, content.data() + done,
                                 static_cast<unsigned>(content.size() - done), done);
    if (n < 0) co_return n;
    if (n == 0) co_return -EIO;
    done += static_cast<std::size_t>(n);
  }
  // The directory entry is journaled with the rename that publishes it; the data is not
  // (delayed allocation): without this a crash could leave an empty link file in a layer.
  if (durable) {
    int r = co_await core::fsync(fd, IORING_FSYNC_DATASYNC);
    if (r < 0) co_return r;
  }
  co_return 0;
}

// statx type of `path` under `dirfd` without following a final symlink: S_IF* bits or -errno.
Task<int> file_type(int dirfd, std::string path) {
  struct statx stx {};
  int r = co_await core::statx(dirfd, path.c_str(), AT_SYMLINK_NOFOLLOW, STATX_TYPE, &stx);
  if (r < 0) co_return r;
  co_return static_cast<int>(stx.stx_mode & S_IFMT);
}

// "../ID/diff" -> ID, or "" when the target has another shape.
std::string id_from_link_target(const std::string& target) {
  constexpr std::string_view kPrefix = "../";
  constexpr std::string_view kSuffix = "/diff";
  std::string_view t = target;
  if (!t.starts_with(kPrefix) || !t.ends_with(kSuffix)) return {};
  t.remove_prefix(kPrefix.size());
  t.remove_suffix(kSuffix.size());
  if (!is_valid_id(t)) return {};
  return std::string(t);
}

std::string link_target_for(std::string_view id) {
  return "../" + std::string(id) + "/" + std::string(kDiffDirName);
}

std::string link_path_for(std::string_view link_id) {
  return std::string(kLinkDirName) + "/" + std::string(link_id);
}

// Offloaded part of remove(): drop l/LINKID when it still points at this layer (a corrupt
// link file must not take another layer's link with it), then delete the trash tree.
void unlink_and_delete(int home_fd, std::string link_id, std::string id, std::string trash) {
  if (is_valid_link_id(link_id)) {
    std::string target;
    std::string lpath = link_path_for(link_id);
    if (detail::read_link(home_fd, lpath, target) == 0 && target == link_target_for(id)) {
      if (::unlinkat(home_fd, lpath.c_str(), 0) != 0 && errno != ENOENT)
        throw Error(errno, "unlinking " + lpath);
    }
  }
  detail::remove_tree_at(home_fd, trash);
}

Store::RepairReport repair_blocking(int home_fd) {
  Store::RepairReport report;
  // 1. Staging and trash leftovers of interrupted creates, applies and removes.
  for (const auto& name : detail::list_dir(home_fd, ".", false)) {
    if (!name.starts_with(kStagingPrefix) && !name.starts_with(kTrashPrefix)) continue;
    detail::remove_tree_at(home_fd, name);
    report.removed.push_back(name);
  }
  // 2. Links whose layer is gone (a create that died before its rename, a remove that died
  //    after its rename). Only symlinks whose target does not resolve are touched.
  for (const auto& name : detail::list_dir(home_fd, std::string(kLinkDirName).c_str(), false)) {
    std::string lpath = link_path_for(name);
    struct stat st {};
    if (::fstatat(home_fd, lpath.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 ||
        !S_ISLNK(st.st_mode))
      continue;
    if (::fstatat(home_fd, lpath.c_str(), &st, 0) == 0) continue;
    if (errno != ENOENT && errno != ENOTDIR) continue;
    if (::unlinkat(home_fd, lpath.c_str(), 0) != 0 && errno != ENOENT)
      throw Error(errno, "unlinking dangling " + lpath);
    report.removed.push_back(lpath);
  }
  // 3. Parents left without `committed` by a create that died between its rename and marking
  //    the parent.
  std::set<std::string> fixed;
  for (const auto& id : detail::list_dir(home_fd, ".", true)) {
    if (!is_valid_id(id)) continue;
    std::string lower;
    if (sys::read_small_file(home_fd, (id + "/lower").c_str(), lower, kSmallFileLimit) < 0)
      continue;
    auto lowers = split_lowers(lower);
    if (lowers.empty()) continue;
    std::string target;
    if (detail::read_link(home_fd, lowers.front(), target) < 0) continue;
    std::string parent = id_from_link_target(target);
    if (parent.empty() || fixed.count(parent)) continue;
    std::string committed = parent + "/" + std::string(kCommittedFileName);
    struct stat st {};
    if (::fstatat(home_fd, committed.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0) continue;
    if (::fstatat(home_fd, parent.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 ||
        !S_ISDIR(st.st_mode))
      continue;
    int fd = ::openat(home_fd, committed.c_str(),
                      O_WRONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) throw Error(errno, "marking layer " + parent + " committed");
    ::close(fd);
    fixed.insert(parent);
    report.fixed.push_back(parent);
  }
  return report;
}

}  // namespace

void validate_id(std::string_view id) {
  if (const char* reason = invalid_reason(id))
    throw Error(EINVAL, "invalid layer id \"" + printable(id) + "\": " + reason);
}

bool is_valid_id(std::string_view id) noexcept { return invalid_reason(id) == nullptr; }

std::string new_link_id() {
  // As the seed: (26*5+7)/8 = 17 random bytes, base32 (RFC 4648, uppercase), first 26 chars.
  static constexpr char kAlphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
  constexpr std::size_t kBytes = (kLinkIdLength * 5 + 7) / 8;
  unsigned char bytes[kBytes];
  fill_random(bytes, kBytes);
  std::string out;
  out.reserve(kLinkIdLength);
  unsigned buffer = 0;
  int bits = 0;
  for (unsigned char b : bytes) {
    buffer = (buffer << 8) | b;
    bits += 8;
    while (bits >= 5 && out.size() < kLinkIdLength) {
      out.push_back(kAlphabet[(buffer >> (bits - 5)) & 31]);
      bits -= 5;
    }
    buffer &= (1u << bits) - 1;
  }
  return out;
}

bool is_valid_link_id(std::string_view link_id) noexcept {
  if (link_id.empty() || link_id == "." || link_id == "..") return false;
  return link_id.find_first_of(std::string_view("/:\0", 3)) == std::string_view::npos;
}

Store::Store(std::string home) {
  if (!home.empty() && home[0] != '/') {
    char cwd[4096];
    if (::getcwd(cwd, sizeof cwd)) home = std::string(cwd) + "/" + home;
  }
  while (home.size() > 1 && home.back() == '/') home.pop_back();
  home_ = std::move(home);
}

std::string Store::layer_dir(std::string_view id) const { return home_ + "/" + std::string(id); }
std::string Store::diff_dir(std::string_view id) const {
  return layer_dir(id) + "/" + std::string(kDiffDirName);
}
std::string Store::work_dir(std::string_view id) const {
  return layer_dir(id) + "/" + std::string(kWorkDirName);
}
std::string Store::merged_dir(std::string_view id) const {
  return layer_dir(id) + "/" + std::string(kMergedDirName);
}

std::vector<std::string> Store::lower_paths(const LayerRecord& record) const {
  std::vector<std::string> out;
  out.reserve(record.lowers.size());
  for (const auto& l : record.lowers) out.push_back(home_ + "/" + l);
  return out;
}

Task<void> Store::open() {
  if (home_.empty()) throw Error(EINVAL, "store home is empty");
  std::string home = home_;
  std::string links = home_ + "/" + std::string(kLinkDirName);
  // mkdir -p walks path components: blocking, so on the pool. The seed makes HOME/l with
  // MkdirAllAndChown(0701), which also chmods an existing l/ to 0701.
  // Named, not a temporary: see resolve_link().
  auto prepare = core::offload([home, links] {
    detail::mkdir_all(home, 0701);
    detail::mkdir_all(links, 0701);
    if (::chmod(links.c_str(), 0701) != 0) throw Error(errno, "setting mode of " + links);
    return detail::read_umask();
  });
  umask_ = co_await prepare;
  int fd = co_await core::openat(AT_FDCWD, home_.c_str(), O_PATH | O_DIRECTORY);
  if (fd < 0) throw Error(fd, "opening store home " + home_);
  home_fd_.reset(fd);
}

Task<bool> Store::exists(std::string_view id) {
  if (!is_valid_id(id)) co_return false;
  int type = co_await file_type(home_fd(), std::string(id));
  if (type == -ENOENT || type == -ENOTDIR) co_return false;
  if (type < 0) throw Error(type, "inspecting layer " + std::string(id));
  co_return type == S_IFDIR;
}

// Throws ENOENT "layer ID does not exist" unless HOME/ID is a directory.
Task<void> Store::require_layer_dir(const std::string& id) {
  int type = co_await file_type(home_fd(), id);
  if (type == -ENOENT || (type >= 0 && type != S_IFDIR))
    throw Error(ENOENT, "layer " + id + " does not exist");
  if (type < 0) throw Error(type, "inspecting layer " + id);
}

Task<LayerRecord> Store::load(std::string_view id_view) {
  validate_id(id_view);
  std::string id(id_view);
  co_await require_layer_dir(id);

  LayerRecord rec;
  rec.id = id;
  std::string text;
  int r = co_await read_file(home_fd(), id + "/" + std::string(kLinkFileName), text);
  if (r == 0) {
    rec.link_id = std::move(text);
  } else if (r != -ENOENT) {
    throw Error(r, "reading link file of layer " + id);
  }
  r = co_await read_file(home_fd(), id + "/" + std::string(kLowerFileName), text);
  if (r == 0) {
    rec.lowers = split_lowers(text);
  } else if (r != -ENOENT) {
    throw Error(r, "reading lower file of layer " + id);
  }
  r = co_await file_type(home_fd(), id + "/" + std::string(kCommittedFileName));
  if (r < 0 && r != -ENOENT) throw Error(r, "inspecting committed mark of layer " + id);
  rec.committed = r >= 0;
  r = co_await file_type(home_fd(), id + "/" + std::string(kWorkDirName));
  if (r < 0 && r != -ENOENT) throw Error(r, "inspecting work dir of layer " + id);
  rec.has_work = r == S_IFDIR;
  co_return rec;
}

Task<std::optional<std::string>> Store::resolve_link(std::string_view link_id) {
  if (!is_valid_link_id(link_id)) co_return std::nullopt;
  std::string lpath = link_path_for(link_id);
  int home = home_fd();
  // readlinkat has no ring op.
  // Named, not a temporary: GCC 12 destroys a temporary awaitable's captures twice when its
  // co_await initialises a variable.
  auto readlink_op = core::offload([home, lpath] {
    std::string t;
    return detail::read_link(home, lpath, t) == 0 ? t : std::string();
  });
  std::string target = co_await readlink_op;
  std::string id = id_from_link_target(target);
  if (id.empty()) co_return std::nullopt;
  co_return id;
}

Task<void> Store::make_dir(std::string rel, unsigned mode, std::string context) {
  int r = co_await core::mkdirat(home_fd(), rel.c_str(), mode);
  if (r < 0) throw Error(r, context);
  // The seed chmods every directory it makes to its exact mode; only needed (and only a
  // cheap inode update) when the umask took bits away.
  if ((mode & umask_) != 0 && ::fchmodat(home_fd(), rel.c_str(), mode, 0) != 0)
    throw Error(errno, context + ": chmod");
}

Task<void> Store::delete_tree(std::string name, std::string context) {
  int home = home_fd();
  try {
    auto op = core::offload([home, name] { detail::remove_tree_at(home, name); });
    co_await op;
  } catch (const Error& e) {
    throw Error(e.errno_value(), context + ": " + e.what());
  }
}

Task<void> Store::undo_create(std::string staging, std::string link_path, bool renamed,
                              std::string id) {
  // Best effort throughout: the caller rethrows the original error.
  if (!link_path.empty()) (void)co_await core::unlinkat(home_fd(), link_path.c_str());
  std::string victim = staging;
  if (renamed) {
    // Make the half-made layer disappear at once, then delete it.
    std::string trash = std::string(kTrashPrefix) + id + "-" + random_suffix();
    int r = co_await core::renameat(home_fd(), id.c_str(), home_fd(), trash.c_str(),
                                    RENAME_NOREPLACE);
    victim = r == 0 ? trash : id;
  }
  try {
    co_await delete_tree(victim, "cleaning up");
  } catch (const Error&) {
    // Left for repair(): the name is a staging/trash name unless the rename above failed.
  }
}

Task<LayerRecord> Store::create(std::string_view id_view, std::string_view parent_view) {
  validate_id(id_view);
  if (!parent_view.empty()) validate_id(parent_view);
  std::string id(id_view);
  std::string parent(parent_view);
  const std::string what = "creating layer " + id;

  if (co_await exists(id)) throw Error(EEXIST, "layer " + id + " already exists");

  std::vector<std::string> lowers;
  if (!parent.empty()) {
    int type = co_await file_type(home_fd(), parent);
    if (type == -ENOENT || (type >= 0 && type != S_IFDIR))
      throw Error(ENOENT, "parent layer " + parent + " does not exist");
    if (type < 0) throw Error(type, what + ": inspecting parent layer " + parent);
    std::string plink;
    int r = co_await read_file(home_fd(), parent + "/" + std::string(kLinkFileName), plink);
    if (r < 0) throw Error(r, what + ": reading link file of parent layer " + parent);
    if (!is_valid_link_id(plink))
      throw Error(EIO, what + ": parent layer " + parent + " has an invalid link id");
    lowers.push_back(link_path_for(plink));
    std::string plower;
    r = co_await read_file(home_fd(), parent + "/" + std::string(kLowerFileName), plower);
    if (r == 0) {
      for (auto& l : split_lowers(plower)) lowers.push_back(std::move(l));
    } else if (r != -ENOENT) {
      throw Error(r, what + ": reading lower file of parent layer " + parent);
    }
    if (lowers.size() > kMaxDepth) throw Error(EINVAL, what + ": max depth exceeded");
  }

  const std::string staging = std::string(kStagingPrefix) + "create-" + id + "-" + random_suffix();
  std::string link_path;  // set once l/LINKID exists
  std::string link_id;
  bool staged = false;
  bool renamed = false;
  std::exception_ptr failure;
  try {
    co_await make_dir(staging, 0701, what + ": creating staging directory");
    staged = true;
    co_await make_dir(staging + "/" + std::string(kDiffDirName), 0755, what + ": creating diff");
    if (!parent.empty()) {
      co_await make_dir(staging + "/" + std::string(kWorkDirName), 0701, what + ": creating work");
      // 0666 before the umask, as the seed's WriteFile.
      int r = co_await write_file(home_fd(), staging + "/" + std::string(kLowerFileName),
                                  join_lowers(lowers), 0666, true);
      if (r < 0) throw Error(r, what + ": writing lower file");
    }
    // The link points at the final name: it dangles until the rename below (repair() removes
    // it if we crash before that).
    const std::string target = link_target_for(id);
    for (int attempt = 0;; ++attempt) {
      std::string candidate = new_link_id();
      std::string cpath = link_path_for(candidate);
      int r = co_await core::symlinkat(target.c_str(), home_fd(), cpath.c_str());
      if (r == 0) {
        link_id = std::move(candidate);
        link_path = std::move(cpath);
        break;
      }
      if (r != -EEXIST || attempt + 1 >= kLinkIdAttempts)
        throw Error(r, what + ": creating link " + cpath);
    }
    int r = co_await write_file(home_fd(), staging + "/" + std::string(kLinkFileName), link_id,
                                0644, true);
    if (r < 0) throw Error(r, what + ": writing link file");
    r = co_await core::renameat(home_fd(), staging.c_str(), home_fd(), id.c_str(),
                                RENAME_NOREPLACE);
    if (r == -EEXIST || r == -ENOTEMPTY) throw Error(EEXIST, "layer " + id + " already exists");
    if (r < 0) throw Error(r, what + ": renaming staging directory into place");
    renamed = true;
    // After the rename, so that a failed create never leaves the parent read-only-mounted.
    if (!parent.empty()) co_await mark_committed(parent);
  } catch (...) {
    failure = std::current_exception();
  }
  if (failure) {
    if (staged) co_await undo_create(staging, link_path, renamed, id);
    std::rethrow_exception(failure);
  }

  LayerRecord rec;
  rec.id = id;
  rec.link_id = link_id;
  rec.lowers = std::move(lowers);
  rec.committed = false;
  rec.has_work = !parent.empty();
  co_return rec;
}

Task<void> Store::mark_committed(std::string_view id_view) {
  validate_id(id_view);
  std::string id(id_view);
  std::string path = id + "/" + std::string(kCommittedFileName);
  // An empty file: its creation alone is atomic, no temp name needed.
  int fd = co_await core::openat(home_fd(), path.c_str(), O_WRONLY | O_CREAT | O_NOFOLLOW, 0600);
  if (fd == -ENOENT) throw Error(ENOENT, "layer " + id + " does not exist");
  if (fd < 0) throw Error(fd, "marking layer " + id + " committed");
  sys::UniqueFd owner(fd);
}

Task<void> Store::remove(std::string_view id_view) {
  validate_id(id_view);
  std::string id(id_view);
  // A layer still mounted on merged/ is refused before it disappears: the trash walk would stop
  // at the mount anyway (EBUSY) and leave the data behind under a trash name. A dead FUSE
  // mount answers stat with ENOTCONN: mounted as well.
  {
    std::string merged = id + "/" + std::string(kMergedDirName);
    struct statx stx {};
    int m = co_await core::statx(home_fd(), merged.c_str(), AT_SYMLINK_NOFOLLOW | AT_NO_AUTOMOUNT,
                                 STATX_TYPE, &stx);
    bool mounted = m == -ENOTCONN || (m == 0 && (stx.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT) &&
                                      (stx.stx_attributes & STATX_ATTR_MOUNT_ROOT));
    if (mounted) throw Error(EBUSY, "removing layer " + id + ": " + merged + " is still mounted");
  }
  std::string link_id;
  int r = co_await read_file(home_fd(), id + "/" + std::string(kLinkFileName), link_id);
  if (r < 0) link_id.clear();  // a layer without link file is still removed
  std::string trash = std::string(kTrashPrefix) + id + "-" + random_suffix();
  r = co_await core::renameat(home_fd(), id.c_str(), home_fd(), trash.c_str(), RENAME_NOREPLACE);
  if (r == -ENOENT) throw Error(ENOENT, "layer " + id + " does not exist");
  if (r < 0) throw Error(r, "removing layer " + id + ": renaming to trash");
  int home = home_fd();
  try {
    auto op = core::offload(
        [home, link_id, id, trash] { unlink_and_delete(home, link_id, id, trash); });
    co_await op;
  } catch (const Error& e) {
    throw Error(e.errno_value(), "removing layer " + id + " (left in " + trash + "): " + e.what());
  }
}

Task<std::vector<std::string>> Store::list() {
  int home = home_fd();
  auto op = core::offload([home] { return detail::list_dir(home, ".", true); });
  auto names = co_await op;
  std::vector<std::string> ids;
  for (auto& n : names)
    if (is_valid_id(n)) ids.push_back(std::move(n));
  std::sort(ids.begin(), ids.end());
  co_return ids;
}

Task<Store::RepairReport> Store::repair() {
  int home = home_fd();
  auto op = core::offload([home] { return repair_blocking(home); });
  co_return co_await op;
}

Task<std::string> Store::make_staging_dir(std::string_view id_view) {
  validate_id(id_view);
  std::string id(id_view);
  co_await require_layer_dir(id);
  std::string name = std::string(kStagingPrefix) + "apply-" + id + "-" + random_suffix();
  co_await make_dir(name, 0755, "creating staging directory for layer " + id);
  co_return home_ + "/" + name;
}

std::string Store::staging_name_for(std::string_view staging_dir, std::string_view id) const {
  std::string_view dir = staging_dir;
  std::string expected = std::string(kStagingPrefix) + "apply-" + std::string(id) + "-";
  if (dir.size() > home_.size() + 1 && dir.starts_with(home_) && dir[home_.size()] == '/') {
    std::string_view name = dir.substr(home_.size() + 1);
    if (name.starts_with(expected) && name.size() > expected.size() &&
        name.find('/') == std::string_view::npos)
      return std::string(name);
  }
  throw Error(EINVAL, "not a staging directory of layer " + printable(id) + ": " +
                          printable(staging_dir));
}

Task<void> Store::replace_diff(std::string_view id_view, std::string_view staging_dir) {
  validate_id(id_view);
  std::string id(id_view);
  std::string name = staging_name_for(staging_dir, id);
  std::string diff = id + "/" + std::string(kDiffDirName);
  // One atomic swap: readers (and a crash) see either the old diff or the new one.
  int r = co_await core::renameat(home_fd(), name.c_str(), home_fd(), diff.c_str(),
                                  RENAME_EXCHANGE);
  if (r < 0) throw Error(r, "replacing diff of layer " + id);
  // The old tree now sits under the staging name. If deleting it fails, the new diff is in
  // place regardless and repair() removes the leftover at the next start.
  try {
    co_await delete_tree(name, "deleting old diff of layer " + id);
  } catch (const Error&) {
  }
}

Task<void> Store::discard_staging_dir(std::string_view staging_dir) {
  std::string_view dir = staging_dir;
  std::string_view name;
  if (dir.size() > home_.size() + 1 && dir.starts_with(home_) && dir[home_.size()] == '/')
    name = dir.substr(home_.size() + 1);
  if (!name.starts_with(kStagingPrefix) || name.find('/') != std::string_view::npos)
    throw Error(EINVAL, "not a staging directory: " + printable(staging_dir));
  co_await delete_tree(std::string(name), "discarding " + std::string(name));
}

}  // namespace layerd::store

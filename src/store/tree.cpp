#include "tree.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstring>
#include <string_view>

#include "layerd/sys/error.hpp"
#include "layerd/sys/fd.hpp"
#include "layerd/sys/syscalls.hpp"

namespace layerd::store::detail {

namespace {

// One directory being emptied: its fd, a DIR stream over a dup of it, and its name in the
// directory below it on the stack (for the final rmdir and error messages).
struct Frame {
  sys::UniqueFd fd;
  DIR* dir = nullptr;
  std::string name;
  std::string path;  // relative to the tree's root, for messages
  Frame() = default;
  Frame(Frame&& o) noexcept
      : fd(std::move(o.fd)), dir(std::exchange(o.dir, nullptr)), name(std::move(o.name)),
        path(std::move(o.path)) {}
  Frame& operator=(Frame&&) = delete;
  ~Frame() {
    if (dir) (void)::closedir(dir);
  }
};

[[noreturn]] void fail(int err, const std::string& what) { throw Error(err, what); }

bool is_mount_root(int dirfd, const char* name) {
  struct statx stx {};
  if (::statx(dirfd, name, AT_SYMLINK_NOFOLLOW | AT_NO_AUTOMOUNT, STATX_TYPE, &stx) != 0)
    return false;
  return (stx.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT) &&
         (stx.stx_attributes & STATX_ATTR_MOUNT_ROOT);
}

// Opens directory `name` under `parent` for emptying, after checking it is not a mount point
// and making it writable and searchable for us.
Frame open_for_removal(int parent, const std::string& name, const std::string& path,
                       dev_t root_dev, const struct stat& st) {
  if (st.st_dev != root_dev || is_mount_root(parent, name.c_str()))
    fail(EBUSY, "refusing to delete across a mount point: " + path);
  // A 0555 or 0000 directory (images ship them) cannot be emptied or even opened by its owner
  // without root: add u+rwx first. Root passes anyway, unless the inode is immutable.
  if ((st.st_mode & 0700) != 0700) {
    if (::fchmodat(parent, name.c_str(), (st.st_mode | 0700) & 07777, 0) != 0 && errno != EPERM)
      fail(errno, "making " + path + " writable");
  }
  int fd = ::openat(parent, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) fail(errno, "opening " + path);
  Frame f;
  f.fd.reset(fd);
  int dup = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (dup < 0) fail(errno, "duplicating fd of " + path);
  f.dir = ::fdopendir(dup);
  if (!f.dir) {
    int err = errno;
    ::close(dup);
    fail(err, "reading " + path);
  }
  f.name = name;
  f.path = path;
  return f;
}

}  // namespace

void remove_tree_at(int dirfd, const std::string& name) {
  struct stat st {};
  if (::fstatat(dirfd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
    if (errno == ENOENT) return;
    fail(errno, "inspecting " + name);
  }
  if (!S_ISDIR(st.st_mode)) {
    if (::unlinkat(dirfd, name.c_str(), 0) != 0 && errno != ENOENT)
      fail(errno, "unlinking " + name);
    return;
  }
  const dev_t root_dev = st.st_dev;
  if (is_mount_root(dirfd, name.c_str()))
    fail(EBUSY, "refusing to delete a mount point: " + name);

  // Iterative depth-first walk: the depth of a layer's tree is client-controlled, the thread's
  // stack is not. Each level holds one fd (and one DIR).
  std::vector<Frame> stack;
  stack.push_back(open_for_removal(dirfd, name, name, root_dev, st));
  while (!stack.empty()) {
    Frame& top = stack.back();
    errno = 0;
    dirent* ent = ::readdir(top.dir);
    if (!ent) {
      if (errno != 0) fail(errno, "reading " + top.path);
      std::string done_name = top.name;
      std::string done_path = top.path;
      stack.pop_back();
      int parent = stack.empty() ? dirfd : stack.back().fd.get();
      if (::unlinkat(parent, done_name.c_str(), AT_REMOVEDIR) != 0 && errno != ENOENT)
        fail(errno, "removing directory " + done_path);
      continue;
    }
    std::string_view entry = ent->d_name;
    if (entry == "." || entry == "..") continue;
    std::string child(entry);
    std::string child_path = top.path + "/" + child;
    bool is_dir = ent->d_type == DT_DIR;
    struct stat cst {};
    if (ent->d_type == DT_DIR || ent->d_type == DT_UNKNOWN) {
      if (::fstatat(top.fd.get(), child.c_str(), &cst, AT_SYMLINK_NOFOLLOW) != 0) {
        if (errno == ENOENT) continue;
        fail(errno, "inspecting " + child_path);
      }
      is_dir = S_ISDIR(cst.st_mode);
    }
    if (is_dir) {
      Frame next = open_for_removal(top.fd.get(), child, child_path, root_dev, cst);
      stack.push_back(std::move(next));  // `top` is invalid from here on
      continue;
    }
    if (::unlinkat(top.fd.get(), child.c_str(), 0) != 0 && errno != ENOENT)
      fail(errno, "unlinking " + child_path);
  }
}

void mkdir_all(const std::string& path, unsigned mode) {
  if (path.empty() || path[0] != '/') fail(EINVAL, "not an absolute path: " + path);
  std::size_t pos = 1;
  while (pos <= path.size()) {
    std::size_t next = path.find('/', pos);
    if (next == std::string::npos) next = path.size();
    if (next > pos) {
      std::string prefix = path.substr(0, next);
      if (::mkdir(prefix.c_str(), mode) == 0) {
        if (::chmod(prefix.c_str(), mode) != 0) fail(errno, "setting mode of " + prefix);
      } else if (errno != EEXIST) {
        fail(errno, "creating " + prefix);
      } else {
        struct stat st {};
        if (::stat(prefix.c_str(), &st) != 0) fail(errno, "inspecting " + prefix);
        if (!S_ISDIR(st.st_mode)) fail(ENOTDIR, "not a directory: " + prefix);
      }
    }
    pos = next + 1;
  }
}

std::vector<std::string> list_dir(int dirfd, const char* path, bool dirs_only) {
  int fd = ::openat(dirfd, path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) fail(errno, std::string("opening ") + path);
  DIR* dir = ::fdopendir(fd);
  if (!dir) {
    int err = errno;
    ::close(fd);
    fail(err, std::string("reading ") + path);
  }
  std::vector<std::string> names;
  for (;;) {
    errno = 0;
    dirent* ent = ::readdir(dir);
    if (!ent) {
      int err = errno;
      if (err != 0) {
        ::closedir(dir);
        fail(err, std::string("reading ") + path);
      }
      break;
    }
    std::string_view name = ent->d_name;
    if (name == "." || name == "..") continue;
    if (dirs_only) {
      bool is_dir = ent->d_type == DT_DIR;
      if (ent->d_type == DT_UNKNOWN) {
        struct stat st {};
        is_dir = ::fstatat(::dirfd(dir), ent->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 &&
                 S_ISDIR(st.st_mode);
      }
      if (!is_dir) continue;
    }
    names.emplace_back(name);
  }
  ::closedir(dir);
  return names;
}

int read_link(int dirfd, const std::string& path, std::string& target) {
  char buf[PATH_MAX];
  ssize_t n = ::readlinkat(dirfd, path.c_str(), buf, sizeof buf);
  if (n < 0) return -errno;
  if (static_cast<std::size_t>(n) >= sizeof buf) return -ENAMETOOLONG;
  target.assign(buf, static_cast<std::size_t>(n));
  return 0;
}

unsigned read_umask() {
  std::string status;
  if (sys::read_small_file(AT_FDCWD, "/proc/self/status", status) < 0) return 022;
  std::size_t pos = status.find("\nUmask:");
  if (pos == std::string::npos) return 022;
  return static_cast<unsigned>(std::strtoul(status.c_str() + pos + 7, nullptr, 8));
}

}  // namespace layerd::store::detail

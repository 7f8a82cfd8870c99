// Mount state: the mount table (/proc/self/mountinfo), a watcher that re-reads it whenever the
// kernel says it changed, and inotify watches on mountpoints. Everything runs on the loop.
#pragma once

#include <coroutine>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "layerd/core/cancel.hpp"
#include "layerd/core/task.hpp"
#include "layerd/sys/fd.hpp"

namespace layerd::watch {

// One line of /proc/<pid>/mountinfo (see proc(5)), with the kernel's octal escapes (\040 space,
// \011 tab, \012 newline, \134 backslash) decoded in every string field.
struct MountEntry {
  int mount_id = 0;
  int parent_id = 0;
  std::string root;           // field 4: the mounted subtree of the filesystem
  std::string mount_point;    // field 5
  std::string options;        // field 6: per-mount options
  std::string fstype;         // after " - ": e.g. "tmpfs", "fuse.fuse-overlayfs"
  std::string source;
  std::string super_options;
  std::string device;                         // field 3: "major:minor"
  std::vector<std::string> optional_fields;   // "shared:N", "master:N", ... (may be empty)

  bool operator==(const MountEntry&) const = default;
};

// Parses mountinfo text. Malformed lines are skipped (the kernel writes none).
std::vector<MountEntry> parse_mountinfo(std::string_view text);
// Decodes \ooo octal escapes; anything else is kept as is.
std::string decode_mountinfo_escapes(std::string_view field);

// The mount table of this process' mount namespace. Not thread-safe: loop thread only.
class MountTable {
 public:
  MountTable() = default;
  MountTable(const MountTable&) = delete;
  MountTable& operator=(const MountTable&) = delete;

  // Re-reads /proc/self/mountinfo with ring reads from offset 0 of a kept fd (opened on first
  // use). Concurrent callers share reads: each returns after a read that started after its
  // call, so the table then reflects every mount change that happened before the call.
  core::Task<void> refresh();

  [[nodiscard]] const std::vector<MountEntry>& entries() const noexcept { return entries_; }
  // The last (topmost) entry mounted on `mount_point`, or null.
  [[nodiscard]] const MountEntry* find(std::string_view mount_point) const;
  [[nodiscard]] bool is_mounted(std::string_view mount_point) const {
    return find(mount_point) != nullptr;
  }
  // Entries whose mount point lies strictly below the directory `prefix` ("/a" matches "/a/b"
  // but neither "/a" itself nor "/ab"), in table order.
  [[nodiscard]] std::vector<const MountEntry*> under(std::string_view prefix) const;
  // Bumps on each refresh that changed the entries.
  [[nodiscard]] std::uint64_t generation() const noexcept { return generation_; }
  // The ticket the next refresh() call takes, and the highest ticket a finished read covers:
  // covered() >= t means the entries come from a read that started after ticket t was taken.
  [[nodiscard]] std::uint64_t next_ticket() const noexcept { return requested_ + 1; }
  [[nodiscard]] std::uint64_t covered() const noexcept { return covered_; }

  // For tests and for embedding: replaces the entries as if read (bumps generation on change).
  void assign(std::vector<MountEntry> entries);

 private:
  struct RoundAwaiter;
  core::Task<void> read_once();

  sys::UniqueFd fd_;
  std::vector<MountEntry> entries_;
  std::uint64_t generation_ = 0;
  // Refresh coalescing: tickets handed to callers, and the highest ticket a finished read
  // covers (a read covers every ticket issued before it started).
  std::uint64_t requested_ = 0;
  std::uint64_t covered_ = 0;
  bool reading_ = false;
  std::vector<std::coroutine_handle<>> refresh_waiters_;  // callers waiting for a read
};

// Polls /proc/self/mountinfo on the ring (POLLPRI|POLLERR: the kernel raises them on every
// change of the namespace's mount table), refreshes the table and dispatches:
// wait_mounted() waiters whose mount point appeared, and on_unmount() for mount points that
// disappeared. Uses its own fd, so the table's fd can be read by anyone at any time.
class MountWatcher {
 public:
  explicit MountWatcher(MountTable& table);
  ~MountWatcher();
  MountWatcher(const MountWatcher&) = delete;
  MountWatcher& operator=(const MountWatcher&) = delete;

  // Loops until `stop` fires (then returns normally). Pending wait_mounted() calls resolve
  // false when it ends. The driver spawns it in a Scope.
  core::Task<void> run(core::CancelSource& stop);

  // Resolves true when `mount_point` is in the table, false if `cancel` fires (or run() ends)
  // first. Asks the kernel (statx: is the path a mount root now?), then waits for table reads
  // that start after the call: an entry left in the table from before, such as the previous
  // mount at the same path that was just unmounted and not re-read yet, never passes for the
  // new one. The kernel's change notification is sticky per fd, so a mount that appears later
  // is not missed either (while run() runs).
  core::Task<bool> wait_mounted(std::string mount_point, core::CancelSource* cancel);

  // Called on the loop for every mount point under a watched prefix (every mount point when
  // no prefix is watched) that disappeared from the table. Replaces an earlier handler. The
  // handler must not throw (exceptions are swallowed and counted).
  void on_unmount(std::function<void(const std::string& mount_point)> handler);
  void watch_prefix(std::string prefix);
  void unwatch_prefix(std::string_view prefix);

  // Refreshes the table now and dispatches what changed (run() does this on every change).
  core::Task<void> refresh_now();

  [[nodiscard]] std::uint64_t changes_seen() const noexcept { return changes_seen_; }
  [[nodiscard]] std::uint64_t handler_errors() const noexcept { return handler_errors_; }
  [[nodiscard]] bool running() const noexcept { return running_; }

 private:
  struct Waiter;
  void dispatch();
  [[nodiscard]] bool watched(const std::string& mount_point) const;

  MountTable& table_;
  std::function<void(const std::string&)> on_unmount_;
  std::vector<std::string> prefixes_;
  std::vector<std::string> known_;  // sorted mount points at the last dispatch
  bool primed_ = false;
  std::vector<Waiter*> waiters_;
  std::uint64_t changes_seen_ = 0;
  std::uint64_t handler_errors_ = 0;
  bool running_ = false;
};

// inotify on mountpoints: IN_UNMOUNT (the filesystem holding the watched inode went away: watch
// a mounted root, HOME/ID/merged while mounted) and IN_DELETE_SELF (watch the directory itself).
// Events are read on the ring.
class InotifyWatcher {
 public:
  InotifyWatcher();  // inotify_init1(IN_CLOEXEC | IN_NONBLOCK); throws layerd::Error
  InotifyWatcher(const InotifyWatcher&) = delete;
  InotifyWatcher& operator=(const InotifyWatcher&) = delete;

  // inotify_add_watch: the watch descriptor, or -errno. The kernel returns the same wd for the
  // same inode and replaces its mask.
  int add(const std::string& path, std::uint32_t mask);
  void remove(int wd);
  [[nodiscard]] int fd() const noexcept { return fd_.get(); }

  // Reads events until `stop` fires, calling handler(wd, mask) for each on the loop. After
  // IN_UNMOUNT and IN_DELETE_SELF the kernel sends IN_IGNORED: the wd is gone. A queue overflow
  // arrives as wd -1 with IN_Q_OVERFLOW: events were lost, re-check everything.
  core::Task<void> run(core::CancelSource& stop,
                       std::function<void(int wd, std::uint32_t mask)> handler);

 private:
  sys::UniqueFd fd_;
};

}  // namespace layerd::watch

#include <fcntl.h>
#include <poll.h>
#include <sys/inotify.h>
#include <sys/stat.h>

#include <algorithm>
#include <cassert>
#include <cstring>
#include <exception>

#include "layerd/core/ops.hpp"
#include "layerd/sync/sync.hpp"
#include "layerd/sys/error.hpp"
#include "layerd/watch/watch.hpp"

namespace layerd::watch {

struct MountWatcher::Waiter {
  std::string mount_point;
  std::uint64_t ticket = 0;  // only reads covering this ticket may satisfy the waiter
  sync::Event event;
  bool found = false;
};

MountWatcher::MountWatcher(MountTable& table) : table_(table) {}

MountWatcher::~MountWatcher() {
  assert(waiters_.empty() && "MountWatcher destroyed with pending wait_mounted()");
}

void MountWatcher::on_unmount(std::function<void(const std::string&)> handler) {
  on_unmount_ = std::move(handler);
}

void MountWatcher::watch_prefix(std::string prefix) {
  while (prefix.size() > 1 && prefix.back() == '/') prefix.pop_back();
  if (std::find(prefixes_.begin(), prefixes_.end(), prefix) == prefixes_.end())
    prefixes_.push_back(std::move(prefix));
}

void MountWatcher::unwatch_prefix(std::string_view prefix) {
  while (prefix.size() > 1 && prefix.back() == '/') prefix.remove_suffix(1);
  prefixes_.erase(std::remove(prefixes_.begin(), prefixes_.end(), prefix), prefixes_.end());
}

bool MountWatcher::watched(const std::string& mount_point) const {
  if (prefixes_.empty()) return true;
  std::string_view mp = mount_point;
  for (const auto& p : prefixes_) {
    if (mp == p) return true;
    if (p == "/" || (mp.size() > p.size() && mp.starts_with(p) && mp[p.size()] == '/'))
      return true;
  }
  return false;
}

void MountWatcher::dispatch() {
  std::vector<std::string> now;
  now.reserve(table_.entries().size());
  for (const auto& e : table_.entries()) now.push_back(e.mount_point);
  std::sort(now.begin(), now.end());
  now.erase(std::unique(now.begin(), now.end()), now.end());

  std::vector<std::string> gone;
  if (primed_) {
    std::set_difference(known_.begin(), known_.end(), now.begin(), now.end(),
                        std::back_inserter(gone));
    if (now != known_) ++changes_seen_;
  }
  known_ = std::move(now);
  primed_ = true;

  // Event::set() only posts the waiter: nothing runs inline, so iterating is safe.
  for (Waiter* w : waiters_) {
    if (!w->event.is_set() && table_.covered() >= w->ticket &&
        std::binary_search(known_.begin(), known_.end(), w->mount_point)) {
      w->found = true;
      w->event.set();
    }
  }
  if (!on_unmount_) return;
  for (const auto& mp : gone) {
    if (!watched(mp)) continue;
    try {
      on_unmount_(mp);
    } catch (...) {
      ++handler_errors_;
    }
  }
}

core::Task<void> MountWatcher::refresh_now() {
  co_await table_.refresh();
  dispatch();
}

core::Task<bool> MountWatcher::wait_mounted(std::string mount_point, core::CancelSource* cancel) {
  Waiter w;
  w.mount_point = std::move(mount_point);
  // The table may still list a mount at this path that is already gone (a Put just before this
  // Get unmounted it and the watcher has not re-read since): it must not count. So the waiter
  // takes only reads that start from now on (its ticket), and the present is asked of the kernel
  // with one statx (a whole-table read per call would cost O(mounts) each in a storm). A mount
  // that appears after the statx raises POLLPRI on the watcher's fd, and the read that follows
  // finds it.
  w.ticket = table_.next_ticket();
  waiters_.push_back(&w);
  struct statx st {};
  auto probe = core::statx(AT_FDCWD, w.mount_point.c_str(), AT_SYMLINK_NOFOLLOW | AT_NO_AUTOMOUNT,
                           STATX_BASIC_STATS, &st);
  if (cancel != nullptr) probe.cancel_on(*cancel);
  int res = co_await probe;
  bool found = res == 0 && (st.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT) &&
               (st.stx_attributes & STATX_ATTR_MOUNT_ROOT);
  if (!found) {
    bool set = co_await w.event.wait(cancel);
    found = set && w.found;
  }
  waiters_.erase(std::remove(waiters_.begin(), waiters_.end(), &w), waiters_.end());
  co_return found;
}

core::Task<void> MountWatcher::run(core::CancelSource& stop) {
  if (running_) throw Error(EBUSY, "mount watcher already running");
  running_ = true;
  std::exception_ptr failure;
  try {
    // A separate fd: the kernel's "changed" state for poll is per open file, and reads of the
    // table's fd by other refreshers must not consume it.
    int fd = co_await core::openat(AT_FDCWD, "/proc/self/mountinfo", O_RDONLY);
    if (fd < 0) throw Error(fd, "opening /proc/self/mountinfo for polling");
    sys::UniqueFd poll_fd(fd);
    co_await refresh_now();
    while (!stop.cancelled()) {
      // The kernel raises POLLPRI|POLLERR (never clearing POLLIN) when the namespace's mount
      // table changed since this fd last polled; io_uring's poll masks POLLIN out for us.
      int r = co_await core::poll(poll_fd.get(), POLLPRI | POLLERR).cancel_on(stop);
      if (r == -ECANCELED || stop.cancelled()) break;
      if (r < 0) throw Error(r, "polling /proc/self/mountinfo");
      co_await refresh_now();
    }
  } catch (...) {
    failure = std::current_exception();
  }
  running_ = false;
  // Nobody will dispatch any more: release the waiters (not found).
  for (Waiter* w : waiters_)
    if (!w->event.is_set()) w->event.set();
  if (failure) std::rethrow_exception(failure);
}

InotifyWatcher::InotifyWatcher() {
  int fd = ::inotify_init1(IN_CLOEXEC | IN_NONBLOCK);
  if (fd < 0) throw Error(errno, "inotify_init1");
  fd_.reset(fd);
}

int InotifyWatcher::add(const std::string& path, std::uint32_t mask) {
  int wd = ::inotify_add_watch(fd_.get(), path.c_str(), mask);
  return wd < 0 ? -errno : wd;
}

void InotifyWatcher::remove(int wd) {
  // EINVAL when the kernel already dropped the watch (IN_IGNORED): nothing left to do.
  (void)::inotify_rm_watch(fd_.get(), wd);
}

namespace {

// Not in the coroutine: a struct with a flexible array member cannot live in a frame.
void deliver_events(const char* buf, std::size_t len,
                    const std::function<void(int, std::uint32_t)>& handler) {
  std::size_t pos = 0;
  while (pos + sizeof(inotify_event) <= len) {
    inotify_event ev;
    std::memcpy(&ev, buf + pos, sizeof ev);  // no alignment assumptions
    pos += sizeof(inotify_event) + ev.len;
    if (handler) handler(ev.wd, ev.mask);
  }
}

}  // namespace

core::Task<void> InotifyWatcher::run(core::CancelSource& stop,
                                     std::function<void(int, std::uint32_t)> handler) {
  std::vector<char> buf(64 * 1024);
  while (!stop.cancelled()) {
    // Depending on the kernel, a ring read of this O_NONBLOCK fd either fails with -EAGAIN
    // when the queue is empty or is parked on the fd's wait queue until events arrive (io_uring
    // arms its internal poll for pollable files). Both are handled: the read itself is
    // cancellable, and -EAGAIN falls back to an explicit poll.
    int n = co_await core::read(fd_.get(), buf.data(), static_cast<unsigned>(buf.size()))
                .cancel_on(stop);
    if (n == -ECANCELED || stop.cancelled()) break;
    if (n == -EINTR) continue;
    if (n == -EAGAIN || n == -EWOULDBLOCK || n == 0) {
      int r = co_await core::poll(fd_.get(), POLLIN).cancel_on(stop);
      if (r == -ECANCELED || stop.cancelled()) break;
      if (r < 0) throw Error(r, "polling inotify fd");
      continue;
    }
    if (n < 0) throw Error(n, "reading inotify events");
    deliver_events(buf.data(), static_cast<std::size_t>(n), handler);
  }
}

}  // namespace layerd::watch

#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>

#include "layerd/sys/fd.hpp"
#include "layerd/sys/syscalls.hpp"

namespace layerd::sys {

int openat2(int dirfd, const char* path, int flags, mode_t mode, std::uint64_t resolve) {
  open_how how{};
  how.flags = static_cast<std::uint64_t>(flags) | O_CLOEXEC;
  how.mode = (flags & (O_CREAT | O_TMPFILE)) ? mode : 0;
  how.resolve = resolve;
  long res = ::syscall(SYS_openat2, dirfd, path, &how, sizeof how);
  return res < 0 ? -errno : static_cast<int>(res);
}

int pidfd_open(pid_t pid) {
  long res = ::syscall(SYS_pidfd_open, pid, 0);
  return res < 0 ? -errno : static_cast<int>(res);
}

int pidfd_send_signal(int pidfd, int sig) {
  long res = ::syscall(SYS_pidfd_send_signal, pidfd, sig, nullptr, 0);
  return res < 0 ? -errno : 0;
}

int read_small_file(int dirfd, const char* path, std::string& out, std::size_t limit) {
  UniqueFd fd(::openat(dirfd, path, O_RDONLY | O_CLOEXEC | O_NOCTTY));
  if (!fd) return -errno;
  std::string data;
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(fd.get(), buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    if (n == 0) break;
    if (data.size() + static_cast<std::size_t>(n) > limit) return -EFBIG;
    data.append(buf, static_cast<std::size_t>(n));
  }
  out = std::move(data);
  return 0;
}

}  // namespace layerd::sys

// Thin wrappers over system calls glibc 2.36 does not wrap (or wraps awkwardly). Each returns the
// kernel's result: >= 0 on success, a negative errno on failure.
#pragma once

#include <linux/openat2.h>
#include <signal.h>
#include <sys/types.h>

#include <cstdint>
#include <string>

namespace layerd::sys {

int openat2(int dirfd, const char* path, int flags, mode_t mode, std::uint64_t resolve);
int pidfd_open(pid_t pid);
int pidfd_send_signal(int pidfd, int sig);

// Reads a whole small file (procfs, sysfs, layer metadata) into `out`. Bounded by `limit`.
int read_small_file(int dirfd, const char* path, std::string& out, std::size_t limit = 1 << 20);

}  // namespace layerd::sys

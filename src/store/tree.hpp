// Blocking helpers of the store, run only on the offload pool (never on the loop thread).
#pragma once

#include <string>
#include <vector>

namespace layerd::store::detail {

// Deletes `name` (relative to `dirfd`) and everything below it. Never follows symlinks, makes
// directories writable before emptying them (a layer may contain 0555 directories), and
// refuses to descend into a mount point (EBUSY): deleting through a still-mounted FUSE
// filesystem would reach into other layers. A missing `name` is success. Throws layerd::Error.
void remove_tree_at(int dirfd, const std::string& name);

// mkdir -p: creates the missing components of absolute `path` with `mode` (then chmod to
// exactly `mode`, as the seed's idtools does). Throws layerd::Error.
void mkdir_all(const std::string& path, unsigned mode);

// Names in the directory `dirfd` refers to (an O_PATH fd is fine), without "." and "..".
// With `dirs_only`, only directories (never symlinks to them). Throws layerd::Error.
std::vector<std::string> list_dir(int dirfd, const char* path, bool dirs_only);

// readlinkat; returns -errno on failure.
int read_link(int dirfd, const std::string& path, std::string& target);

// The process umask, from /proc/self/status (umask(2) cannot read it without changing it).
unsigned read_umask();

}  // namespace layerd::store::detail

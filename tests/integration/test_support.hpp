// Helpers shared by the integration tests: temp dirs, files, the mount table, processes.
#pragma once

#include <sys/types.h>

#include <optional>
#include <string>
#include <vector>

namespace layerd::test {

// Why FUSE tests cannot run here (not root, no /dev/fuse, no fuse-overlayfs), or nullopt.
std::optional<std::string> fuse_unavailable_reason();

std::string make_temp_dir(const std::string& prefix);
std::string read_file(const std::string& path);
// Creates missing parent directories.
void write_file(const std::string& path, const std::string& content);
// Sorted recursive listing "relative/path type size" of a tree (symlinks not followed).
std::vector<std::string> listing(const std::string& root);
// Mount points at or below `prefix`, from /proc/self/mountinfo.
std::vector<std::string> mounts_under(const std::string& prefix);
bool is_mounted(const std::string& mount_point);
// Pids of live fuse-overlayfs processes serving a mountpoint under `home` (their last argument).
std::vector<pid_t> fuse_server_pids(const std::string& home);
std::size_t fuse_servers_in(const std::string& home);
// True if `pid` exists and is not a zombie.
bool process_exists(pid_t pid);

}  // namespace layerd::test

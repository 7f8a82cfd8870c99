// Building fuse-overlayfs mount options the way Docker's fuse-overlayfs driver does, with paths
// relative to the home (fuse-overlayfs runs with its cwd there), so a 128-lower chain fits in one
// page of mount data.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace layerd::driver {

struct MountSpec {
  std::string id;
  std::vector<std::string> lowers;  // as in the layer's `lower` file: "l/LINKID", nearest first
  bool read_only = false;           // a committed layer: its diff becomes the top lower
  std::string mount_label;          // SELinux context, empty when none
};

// "lowerdir=l/A:l/B,upperdir=ID/diff,workdir=ID/work" or, read-only,
// "lowerdir=ID/diff:l/A:l/B", plus ",context=\"LABEL\"" when a mount label is given.
std::string build_mount_options(const MountSpec& spec);

}  // namespace layerd::driver

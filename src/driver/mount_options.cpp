#include "mount_options.hpp"

namespace layerd::driver {

namespace {
std::string join_lowers(const std::vector<std::string>& lowers) {
  std::string out;
  for (const auto& lower : lowers) {
    if (!out.empty()) out += ':';
    out += lower;
  }
  return out;
}
}  // namespace

std::string build_mount_options(const MountSpec& spec) {
  std::string options;
  if (spec.read_only) {
    options = "lowerdir=" + spec.id + "/diff";
    if (!spec.lowers.empty()) options += ":" + join_lowers(spec.lowers);
  } else {
    options = "lowerdir=" + join_lowers(spec.lowers) + ",upperdir=" + spec.id +
              "/diff,workdir=" + spec.id + "/work";
  }
  // As label.FormatMountLabel does: the context option only when a label is given.
  if (!spec.mount_label.empty()) options += ",context=\"" + spec.mount_label + "\"";
  return options;
}

}  // namespace layerd::driver

#include "paths.hpp"

#include <climits>
#include <vector>

#include "layerd/sys/error.hpp"

namespace layerd::archive {

Path clean_path(const std::string& name, std::size_t max_length, const std::string& entry) {
  auto fail = [&](int err, const std::string& what) {
    throw Error(err, "tar entry '" + entry.substr(0, 512) + "': " + what);
  };
  if (name.size() > max_length + 2 * 4096) fail(ENAMETOOLONG, "name too long");
  std::vector<std::string> parts;
  std::size_t i = 0;
  while (i <= name.size()) {
    std::size_t j = name.find('/', i);
    if (j == std::string::npos) j = name.size();
    std::string part = name.substr(i, j - i);
    i = j + 1;
    if (part.empty() || part == ".") continue;
    if (part == "..") {
      if (parts.empty()) fail(EXDEV, "path escapes the layer root ('..')");
      parts.pop_back();
      continue;
    }
    if (part.size() > NAME_MAX) fail(ENAMETOOLONG, "a name component longer than 255 bytes");
    if (part.find('\0') != std::string::npos) fail(EINVAL, "a NUL byte in the name");
    parts.push_back(std::move(part));
  }
  Path p;
  for (std::size_t k = 0; k < parts.size(); ++k) {
    if (k > 0) p.rel += '/';
    if (k + 1 == parts.size()) {
      p.parent = p.rel.empty() ? std::string() : p.rel.substr(0, p.rel.size() - 1);
      p.base = parts[k];
    }
    p.rel += parts[k];
  }
  if (p.rel.size() > max_length) fail(ENAMETOOLONG, "name longer than the limit of " + std::to_string(max_length));
  return p;
}

}  // namespace layerd::archive

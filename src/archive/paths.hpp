// Lexical path handling shared by apply and export.
#pragma once

#include <cstddef>
#include <string>

namespace layerd::archive {

struct Path {
  std::string rel;     // cleaned, relative to the layer root, no leading or trailing '/'; "" = root
  std::string parent;  // rel of the parent ("" = root)
  std::string base;    // last component ("" for the root)
};

// Cleans a tar name as Docker does (filepath.Clean of the name, a leading '/' stripped: "/etc/x"
// is "etc/x", "a/./b//c/../d" is "a/b/d"). Throws Error naming `entry` when the name climbs out
// of the root ("../x", "a/../../x"), when a component exceeds NAME_MAX or the cleaned path
// exceeds `max_length`, or when it contains a NUL.
Path clean_path(const std::string& name, std::size_t max_length, const std::string& entry);

}  // namespace layerd::archive

#include "layerd/sys/error.hpp"

#include <cstring>

namespace layerd {

std::string errno_message(int err) {
  if (err < 0) err = -err;
  return std::strerror(err);
}

}  // namespace layerd
